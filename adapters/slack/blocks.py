"""Block Kit for the adapter's messages: answer parts, choices, outcomes.

Block ids say what a block holds (`lb_choice` is a choice's text), so a click
handler can rebuild a message from its own blocks without any saved state. The
answer's text is a `markdown` block (standard Markdown, which Slack renders; it
keeps no block id); everything else is mrkdwn, converted by mrkdwn.py.
"""

from __future__ import annotations

from typing import Any

from adapters.actions import Action
from adapters.slack.mrkdwn import escape, to_mrkdwn
from adapters.views import ChoiceView, MessageView, Question

Block = dict[str, Any]
ACTIVITY_BLOCK = "lb_activity"
STATUS_BLOCK = "lb_status"
CONTROLS_BLOCK = "lb_controls"
CHOICE_BLOCK = "lb_choice"
CHOICE_ACTIONS_BLOCK = "lb_choice_actions"
OUTCOME_BLOCK = "lb_outcome"
LINK_BLOCK = "lb_link"
# A question's select menu lives in a block named after the question.
QUESTION_BLOCK_PREFIX = "lb_q|"
# Slack's limits on elements.
BUTTON_TEXT = 75
OPTION_TEXT = 75
OPTION_VALUE = 150
CONTEXT_TEXT = 3000
# A message's `text` holds at most 4,000 characters; as a notification, less is more.
TEXT_LIMIT = 4000
NOTIFICATION_TEXT = 1000
MAX_OPTION_BUTTONS = 5
MAX_SELECT_OPTIONS = 100
THINKING = "_…_"


def message_blocks(view: MessageView) -> tuple[str, list[Block]]:
    """(notification text, blocks) of one message of an answer: the answer's Markdown as
    is, in a `markdown` block (Slack renders it); the rest in mrkdwn."""
    markdown = view.shown_text.strip()
    blocks: list[Block] = []
    if markdown:
        blocks.append({"type": "markdown", "text": markdown})
    lines = list(view.activity)
    if view.hidden_activity:
        lines.insert(0, f"+{view.hidden_activity} more")
    if lines:
        blocks.append(context_block(ACTIVITY_BLOCK, "\n".join(to_mrkdwn(line) for line in lines)))
    status = status_line(view)
    if status:
        blocks.append(context_block(STATUS_BLOCK, status))
    blocks.extend(link_blocks(view))
    if view.stop:
        blocks.append(controls_block(view.loop_id))
    return (notification_text(markdown) or status or "…"), blocks


def notification_text(markdown: str) -> str:
    """The start of an answer as mrkdwn, for the notification and for clients that show
    no blocks (Slack does not render Markdown there)."""
    if len(markdown) > NOTIFICATION_TEXT:
        markdown = markdown[:NOTIFICATION_TEXT].rstrip() + "…"
    return to_mrkdwn(markdown).strip()[:TEXT_LIMIT]


def link_blocks(view: MessageView) -> list[Block]:
    """The "View loop" link of a loop's first reply."""
    if not view.link:
        return []
    return [context_block(LINK_BLOCK, f":link: <{view.link}|View loop>")]


def status_line(view: MessageView) -> str:
    if view.state == "queued":
        return f":hourglass_flowing_sand: {escape(view.note or 'queued')}"
    if view.state == "interrupted":
        return ":black_square_for_stop: Stopped."
    if view.state == "error":
        return f":warning: {escape(view.note or 'Error.')}"
    if view.live and not view.text.strip() and not view.activity:
        return THINKING
    return ""


def controls_block(loop_id: str) -> Block:
    stop = _button("lb_stop", "Stop", Action("stop", loop_id).encode(), style="danger")
    return {"type": "actions", "block_id": CONTROLS_BLOCK, "elements": [stop]}


def choice_blocks(view: ChoiceView) -> tuple[str, list[Block]]:
    blocks: list[Block] = [section_block(CHOICE_BLOCK, _choice_text(view))]
    if view.state == "pending":
        blocks.extend(_choice_controls(view))
    elif view.outcome:
        blocks.append(context_block(OUTCOME_BLOCK, to_mrkdwn(view.outcome)))
    return _plain_title(view), blocks


def resolved_blocks(blocks: list[Block], outcome_mrkdwn: str) -> list[Block]:
    """A choice message's own blocks without its controls, and who decided what."""
    kept = [
        block
        for block in blocks
        if block.get("type") != "actions" and block.get("block_id") != OUTCOME_BLOCK
    ]
    return [*kept, context_block(OUTCOME_BLOCK, outcome_mrkdwn)]


def _choice_text(view: ChoiceView) -> str:
    if view.kind == "permission":
        text = f":lock: *{escape(view.title)}*"
        if view.detail:
            text += f"\n```{escape(view.detail)}```"
        return text
    lines = [":question: *The agent asks*"]
    for question in view.questions:
        header = f"*{escape(question.header)}:* " if question.header else ""
        lines.append(f"{header}{escape(question.text)}")
        for option in question.options:
            detail = f" — {escape(option.description)}" if option.description else ""
            lines.append(f"• {escape(option.label)}{detail}")
    return "\n".join(lines)


def _plain_title(view: ChoiceView) -> str:
    return view.title if view.kind == "question" else f"{view.title} {view.detail}".strip()


def _choice_controls(view: ChoiceView) -> list[Block]:
    if view.kind == "permission":
        allow = Action("allow", view.loop_id, view.choice_id).encode()
        deny = Action("deny", view.loop_id, view.choice_id).encode()
        elements = [
            _button("lb_allow", "Allow", allow, style="primary"),
            _button("lb_deny", "Deny", deny, style="danger"),
        ]
        return [{"type": "actions", "block_id": CHOICE_ACTIONS_BLOCK, "elements": elements}]
    if len(view.questions) == 1 and _as_buttons(view.questions[0]):
        question = view.questions[0]
        elements = [
            _button(
                f"lb_answer_{index}",
                option.label,
                # The label rides along in the value: a button's text may be cut short.
                f"{Action('answer', view.loop_id, view.choice_id, question.id).encode()}\n"
                f"{option.label}",
            )
            for index, option in enumerate(question.options)
        ]
        return [{"type": "actions", "block_id": CHOICE_ACTIONS_BLOCK, "elements": elements}]
    blocks = [_select_block(index, question) for index, question in enumerate(view.questions)]
    submit = _button(
        "lb_submit",
        "Submit",
        Action("submit", view.loop_id, view.choice_id).encode(),
        style="primary",
    )
    blocks.append({"type": "actions", "block_id": CHOICE_ACTIONS_BLOCK, "elements": [submit]})
    return blocks


def _as_buttons(question: Question) -> bool:
    return not question.multi_select and 0 < len(question.options) <= MAX_OPTION_BUTTONS


def _select_block(index: int, question: Question) -> Block:
    options = [
        {"text": _plain(option.label, OPTION_TEXT), "value": option.label[:OPTION_VALUE]}
        for option in question.options[:MAX_SELECT_OPTIONS]
    ]
    kind = "multi_static_select" if question.multi_select else "static_select"
    placeholder = "Choose any" if question.multi_select else "Choose one"
    element = {
        "type": kind,
        "action_id": f"lb_pick_{index}",
        "placeholder": _plain(placeholder, OPTION_TEXT),
        "options": options,
    }
    block_id = f"{QUESTION_BLOCK_PREFIX}{question.id}"
    return {"type": "actions", "block_id": block_id, "elements": [element]}


def selected_answers(state_values: dict[str, Any]) -> dict[str, str | list[str]]:
    """The answers picked in a message's select menus (from a block_actions `state`)."""
    answers: dict[str, str | list[str]] = {}
    for block_id, elements in state_values.items():
        if not block_id.startswith(QUESTION_BLOCK_PREFIX):
            continue
        question_id = block_id.removeprefix(QUESTION_BLOCK_PREFIX)
        for element in elements.values():
            if element.get("selected_options"):
                answers[question_id] = [opt["value"] for opt in element["selected_options"]]
            elif element.get("selected_option"):
                answers[question_id] = element["selected_option"]["value"]
    return answers


def section_block(block_id: str, mrkdwn: str) -> Block:
    return {"type": "section", "block_id": block_id, "text": {"type": "mrkdwn", "text": mrkdwn}}


def context_block(block_id: str, mrkdwn: str) -> Block:
    text = mrkdwn if len(mrkdwn) <= CONTEXT_TEXT else mrkdwn[: CONTEXT_TEXT - 1] + "…"
    return {"type": "context", "block_id": block_id, "elements": [{"type": "mrkdwn", "text": text}]}


def _plain(text: str, limit: int) -> dict[str, Any]:
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return {"type": "plain_text", "text": shown or " ", "emoji": True}


def _button(action_id: str, label: str, value: str, style: str | None = None) -> Block:
    button: Block = {
        "type": "button",
        "action_id": action_id,
        "text": _plain(label, BUTTON_TEXT),
        "value": value,
    }
    if style:
        button["style"] = style
    return button
