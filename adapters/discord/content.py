"""The text of the adapter's Discord messages: answer parts, their status, choices.

A message's `content` holds only the answer's Markdown (Discord renders it as
the model wrote it), so the text a person reads is exactly the model's. Tool
activity and the turn's status go in a small embed below it, which Discord
limits separately (4,096 characters), so they never push the answer over 2,000.
"""

from __future__ import annotations

import discord

from adapters.discord.settings import CONTENT_LIMIT
from adapters.views import ChoiceView, MessageView

# What a choice's own text may take, leaving room for the outcome line added below it.
CHOICE_LIMIT = 1700
EMBED_LIMIT = 4096
NOTE_LIMIT = 1000
THINKING = "…"
NO_TEXT = "Done, without a text answer."


def measure(text: str) -> int:
    """A length Discord's 2,000 never undercuts: UTF-16 units (emoji count twice)."""
    return len(text.encode("utf-16-le")) // 2


def answer_content(view: MessageView) -> str:
    return view.shown_text


def status_embed(view: MessageView) -> discord.Embed | None:
    """Tool activity and how the turn stands, when there is anything to say."""
    lines: list[str] = []
    if view.attachment:
        lines.append(f"📎 The rest of the answer is attached ({len(view.attachment):,} chars).")
    if view.hidden_activity:
        lines.append(f"+{view.hidden_activity} more")
    lines += view.activity
    if view.state == "queued":
        lines.append(f"⏳ {view.note or 'queued'}")
    elif view.state == "interrupted":
        lines.append("⏹️ Stopped.")
    elif view.state == "error":
        lines.append(f"⚠️ {_cut(view.note or 'Error.', NOTE_LIMIT)}")
    elif view.live and not view.text.strip() and not view.activity:
        lines.append(THINKING)
    elif not view.text.strip() and not lines:
        lines.append(NO_TEXT)  # Discord refuses a message with nothing in it
    if view.link:
        lines.append(f"🔗 [View loop]({view.link})")
    if not lines:
        return None
    return discord.Embed(description=_cut("\n".join(lines), EMBED_LIMIT))


def choice_content(view: ChoiceView) -> str:
    """A choice's question, and once decided, who decided what."""
    if view.kind == "permission":
        lines = [f"🔐 **{discord.utils.escape_markdown(view.title)}**"]
        if view.detail:
            lines.append(f"```\n{_fence_safe(view.detail)}\n```")
    else:
        lines = ["❓ **The agent asks**"]
        for question in view.questions:
            text = discord.utils.escape_markdown(question.text)
            if question.header:
                text = f"**{discord.utils.escape_markdown(question.header)}:** {text}"
            lines.append(text)
            for option in question.options:
                detail = f" — {option.description}" if option.description else ""
                lines.append(f"• {discord.utils.escape_markdown(option.label + detail)}")
    text = _fit_block("\n".join(lines), CHOICE_LIMIT)
    if view.state != "pending" and view.outcome:
        return with_outcome(text, view.outcome)
    return text


def with_outcome(content: str, outcome: str) -> str:
    """A choice message's text with its outcome below it."""
    return _cut(f"{content}\n\n{outcome}", CONTENT_LIMIT)


def _fence_safe(text: str) -> str:
    # A fence inside the detail would end the code block early.
    return text.replace("```", "`\u200b``")


def _fit_block(text: str, limit: int) -> str:
    """`text` cut to `limit`, closing a code block the cut left open."""
    if measure(text) <= limit:
        return text
    cut = _cut(text, limit - 4)
    return cut + "\n```" if cut.count("```") % 2 else cut


def _cut(text: str, limit: int) -> str:
    if measure(text) <= limit:
        return text
    while measure(text) > limit - 1:
        text = text[: max(0, len(text) - (measure(text) - limit + 1))]
    return text + "…"
