"""The model's Markdown as Slack mrkdwn, so people never see raw Markdown.

Slack's mrkdwn differs from Markdown: `*bold*`, `_italic_`, `~strike~`,
`<url|text>` links, no headings, and code fences without a language (Slack
would show the language as the first line of code). `&`, `<` and `>` must be
escaped everywhere, code included. Conversion is line by line and keeps code
blocks and inline code verbatim apart from that escaping, so a part of the
answer converts the same alone as inside the whole.
"""

from __future__ import annotations

import re

from adapters.split import FENCE_LINE, Fence

HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
BULLET = re.compile(r"^(\s*)[-*+]\s+(?=\S)")
RULE = re.compile(r"^ {0,3}([-*_])(\s*\1){2,}\s*$")
QUOTE = re.compile(r"^(\s*(?:>\s?)+)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
AUTOLINK = re.compile(r"&lt;(https?://[^\s&]+(?:&amp;[^\s&]+)*)&gt;")
BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
ITALIC_STAR = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])")
STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
# Bold becomes `*…*` only after italics are done, so the two cannot be confused.
BOLD_MARK = "\x00"
RULE_TEXT = "──────────"


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(markdown: str) -> str:
    out: list[str] = []
    fence: Fence | None = None
    for line in markdown.split("\n"):
        if fence is not None:
            if fence.closes(line):
                fence = None
                out.append("```")
            else:
                out.append(escape(line))
            continue
        match = FENCE_LINE.match(line)
        if match is not None and "`" not in match.group(2):
            fence = Fence(match.group(1), line.strip())
            out.append("```")
            continue
        out.append(_line(line))
    return "\n".join(out)


def _line(line: str) -> str:
    if RULE.match(line):
        return RULE_TEXT
    heading = HEADING.match(line)
    if heading is not None:
        inner = _inline(heading.group(1)).replace(BOLD_MARK, "")
        inner = inner.strip("*")
        return f"*{inner}*" if inner else ""
    prefix = ""
    quote = QUOTE.match(line)
    if quote is not None:
        prefix = ">" * quote.group(1).count(">") + " "
        line = line[quote.end() :]
    bullet = BULLET.match(line)
    if bullet is not None:
        prefix += f"{bullet.group(1)}• "
        line = line[bullet.end() :]
    return prefix + _inline(line).replace(BOLD_MARK, "*")


def _inline(text: str) -> str:
    """Formatting outside inline code; code spans keep their text, escaped."""
    pieces: list[str] = []
    position = 0
    for code in INLINE_CODE.finditer(text):
        pieces.append(_format(text[position : code.start()]))
        pieces.append(f"`{escape(code.group(2))}`")
        position = code.end()
    pieces.append(_format(text[position:]))
    return "".join(pieces)


def _format(text: str) -> str:
    if not text:
        return text
    text = escape(text)
    text = IMAGE.sub(lambda m: f"<{m.group(2)}|{m.group(1) or m.group(2)}>", text)
    text = LINK.sub(lambda m: f"<{m.group(2)}|{m.group(1)}>", text)
    text = AUTOLINK.sub(lambda m: f"<{m.group(1)}>", text)
    text = BOLD.sub(lambda m: f"{BOLD_MARK}{m.group(1) or m.group(2)}{BOLD_MARK}", text)
    text = ITALIC_STAR.sub(lambda m: f"_{m.group(1)}_", text)
    return STRIKE.sub(lambda m: f"~{m.group(1)}~", text)


def from_slack(text: str) -> str:
    """A person's Slack text as plain text for the model: links and escapes undone."""
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", r"[\2](\1)", text)
    text = re.sub(r"<(https?://[^>]+)>", r"\1", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
