"""Buttons and select menus of the adapter's messages, and reading a click back.

Every control's `custom_id` is an `Action` (loop, choice, what it does), so a
click is understood from the click alone: no view is kept in memory, and a
button still works after the bot restarts. The views built here only describe
components; they are stopped before sending so discord.py does not keep them.

- a permission: Allow / Deny buttons;
- one question of at most 5 (`option_buttons`) short options: a button each; the
  `custom_id` carries the question id and the option's index, the label is read
  from the clicked message itself;
- otherwise one select menu per question (several may be chosen when the
  question allows it). With one question the choice answers it at once; with
  several, each choice is kept in the message (as the options' `default`) and
  a Submit button answers them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import discord

from adapters.actions import Action
from adapters.views import ChoiceView, MessageView, Question

Answers = dict[str, str | list[str]]
BUTTON_LABEL = 80
SELECT_TEXT = 100
SELECT_OPTIONS = 25
PLACEHOLDER = 150
SUBMIT_LABEL = "Submit"


def answer_view(view: MessageView) -> discord.ui.View | None:
    """The Stop button of a live answer."""
    if not view.stop:
        return None
    stop = Action("stop", view.loop_id).encode()
    return _sent(discord.ui.Button(label="Stop", style=discord.ButtonStyle.danger, custom_id=stop))


def choice_view(view: ChoiceView, option_buttons: int = 5) -> discord.ui.View | None:
    if view.state != "pending":
        return None
    if view.kind == "permission":
        return _sent(
            discord.ui.Button(
                label="Allow",
                style=discord.ButtonStyle.success,
                custom_id=Action("allow", view.loop_id, view.choice_id).encode(),
            ),
            discord.ui.Button(
                label="Deny",
                style=discord.ButtonStyle.danger,
                custom_id=Action("deny", view.loop_id, view.choice_id).encode(),
            ),
        )
    if len(view.questions) == 1 and _as_buttons(view.questions[0], option_buttons):
        question = view.questions[0]
        return _sent(
            *(
                discord.ui.Button(
                    label=option.label,
                    style=discord.ButtonStyle.primary,
                    custom_id=Action(
                        "answer", view.loop_id, view.choice_id, f"{question.id}:{index}"
                    ).encode(),
                )
                for index, option in enumerate(question.options)
            )
        )
    items: list[discord.ui.Item[Any]] = [
        _select(view, question, row) for row, question in enumerate(view.questions[:4])
    ]
    if len(view.questions) > 1:
        submit = Action("submit", view.loop_id, view.choice_id).encode()
        items.append(
            discord.ui.Button(
                label=SUBMIT_LABEL,
                style=discord.ButtonStyle.success,
                custom_id=submit,
                row=len(items),
            )
        )
    return _sent(*items)


def _as_buttons(question: Question, most: int) -> bool:
    return (
        not question.multi_select
        and 0 < len(question.options) <= most
        and all(0 < len(option.label) <= BUTTON_LABEL for option in question.options)
    )


def _select(view: ChoiceView, question: Question, row: int) -> discord.ui.Select[Any]:
    options = [
        discord.SelectOption(
            label=option.label[:SELECT_TEXT] or "…",
            value=option.label[:SELECT_TEXT] or "…",
            description=option.description[:SELECT_TEXT] or None,
        )
        for option in question.options[:SELECT_OPTIONS]
    ]
    return discord.ui.Select(
        custom_id=Action("answer", view.loop_id, view.choice_id, question.id).encode(),
        placeholder=(question.header or question.text or "Choose")[:PLACEHOLDER],
        options=options,
        min_values=1,
        max_values=len(options) if question.multi_select else 1,
        row=row,
    )


def _sent(*items: discord.ui.Item[Any]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    view.stop()  # a description to send, not a listener: clicks go to on_interaction
    return view


# ---- reading a click back ------------------------------------------------------------------


def is_pick(interaction: discord.Interaction, action: Action) -> bool:
    """A choice in one of several select menus: kept in the message until Submit."""
    return (
        action.verb == "answer"
        and _component_type(interaction) == discord.ComponentType.select.value
        and interaction.message is not None
        and any(action.verb == "submit" for action in _actions(interaction.message))
    )


def picked_view(interaction: discord.Interaction) -> discord.ui.View:
    """The clicked message's controls, with this select's choice remembered in it."""
    assert interaction.message is not None
    view = discord.ui.View.from_message(interaction.message, timeout=None)
    chosen = set(_values(interaction))
    custom_id = interaction_data(interaction).get("custom_id")
    for item in view.children:
        if isinstance(item, discord.ui.Select) and item.custom_id == custom_id:
            for option in item.options:
                option.default = option.value in chosen
    view.stop()
    return view


def answers_of(interaction: discord.Interaction, action: Action) -> Answers | None:
    """What a click answers: {question id: label or labels}, or None for other actions."""
    message = interaction.message
    if message is None:
        return None
    if action.verb == "submit":
        return {
            select_action.arg: _value(select, [o.value for o in select.options if o.default])
            for select, select_action in _selects(message)
            if any(option.default for option in select.options)
        }
    if action.verb != "answer":
        return None
    if _component_type(interaction) == discord.ComponentType.button.value:
        question_id, _, _ = action.arg.rpartition(":")
        label = _label(message, str(interaction_data(interaction).get("custom_id", "")))
        return {question_id: label} if label else None
    select = next((s for s, a in _selects(message) if a == action), None)
    if select is None:
        return None
    return {action.arg: _value(select, _values(interaction))}


def _value(select: discord.SelectMenu, values: list[str]) -> str | list[str]:
    return values if select.max_values > 1 else (values[0] if values else "")


def interaction_data(interaction: discord.Interaction) -> Mapping[str, Any]:
    """An interaction's `data` (a union of TypedDicts in discord.py) as the JSON it is."""
    return cast(Mapping[str, Any], interaction.data or {})


def _component_type(interaction: discord.Interaction) -> int | None:
    kind = interaction_data(interaction).get("component_type")
    return kind if isinstance(kind, int) else None


def _values(interaction: discord.Interaction) -> list[str]:
    return [str(value) for value in interaction_data(interaction).get("values", [])]


def _controls(message: discord.Message) -> list[discord.Button | discord.SelectMenu]:
    found: list[discord.Button | discord.SelectMenu] = []
    for row in message.components:
        if isinstance(row, discord.ActionRow):
            found += [c for c in row.children if isinstance(c, discord.Button | discord.SelectMenu)]
    return found


def _actions(message: discord.Message) -> list[Action]:
    decoded = (Action.decode(c.custom_id or "") for c in _controls(message))
    return [action for action in decoded if action is not None]


def _selects(message: discord.Message) -> list[tuple[discord.SelectMenu, Action]]:
    found = []
    for control in _controls(message):
        action = Action.decode(control.custom_id or "")
        if isinstance(control, discord.SelectMenu) and action is not None:
            found.append((control, action))
    return found


def _label(message: discord.Message, custom_id: str) -> str | None:
    for control in _controls(message):
        if isinstance(control, discord.Button) and control.custom_id == custom_id:
            return control.label
    return None
