"""Platform adapters (Slack, Discord) and the platform-neutral part they share.

The shared part, which an adapter uses and never copies:

- `shell`, `runner`, `settings`: the adapter base — the shell a platform subclasses
  (start, stop, run, idle), starting it alone or inside the server, and the settings
  base class (where the Loop API is, who may do what);
- `binding`: a conversation key ↔ a loop, kept in the loop's metadata;
- `policy`: who may talk to the agent and who may decide its choices;
- `conversations`: a person's message → the loop's turn, rendered; a click → a decision;
- `showing`: the one way a turn is shown until it ends, and the follower that shows
  the rest of a turn after a restart; `background`: turns no message started;
- `clicks`: a click decided, its outcome shown, the rest of its turn followed;
- `render`, `split`, `views`, `surface`: showing a turn as live messages within limits;
- `actions`: what a button means, encoded in the button;
- `dedupe`: dropping an event the platform delivered twice;
- `backoff`, `startup`, `tasks`, `metrics`: retries, start errors, handler tasks, counters.

Adapters talk to loops only through `bridge.client.LoopClient`, never `core/`.
"""

from adapters.actions import Action
from adapters.binding import Binding, ConversationKey, ThreadBindings
from adapters.conversations import Conversations, Decision, IncomingMessage, TurnResult
from adapters.policy import Actor, Policy
from adapters.render import TurnRenderer
from adapters.split import PartSplitter, split_markdown
from adapters.surface import Surface
from adapters.views import ChoiceView, MessageView

__all__ = [
    "Action",
    "Actor",
    "Binding",
    "ChoiceView",
    "ConversationKey",
    "Conversations",
    "Decision",
    "IncomingMessage",
    "MessageView",
    "PartSplitter",
    "Policy",
    "Surface",
    "ThreadBindings",
    "TurnRenderer",
    "TurnResult",
    "split_markdown",
]
