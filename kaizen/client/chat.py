"""`kaizen chat`: talk to a running server from a terminal and rate its answers with a key.

    kaizen chat --target HOST:PORT [--user ID] [--max-new-tokens N] [--temperature T]

Type a question: the answer streams in as it is generated, then the version that wrote
it and the keys: `+`/`-` thumb up/down, `1`-`5` a rating, `c` a comment, `e` a
correction (the answer you wanted), `r` regenerate (tells the server, then asks again),
Enter the next question. Keys are read one at a time, without Enter, when stdin is a
terminal; from a pipe each is a line, and a line that is not a key is the next question.
Ctrl-D or /quit leaves; /new starts a new conversation. The credential comes from
--key-file or $KAIZEN_API_KEY, never from the command line.
"""

from __future__ import annotations

import os
import sys
import termios
import tty

import grpc

from kaizen.client import (
    CREDENTIAL_ENV,
    Answer,
    Client,
    add_connection_options,
    connection_options,
)

CONNECT_TIMEOUT_S = 15.0  # the first call, which checks the target and the credential
KEYS = "keys: + good  - bad  1-5 rate  c comment  e correct it  r regenerate  Enter next"
# one key, one feedback event: what it is called on screen, and the signal it sends
SIGNALS: dict[str, tuple[str, dict[str, object]]] = {
    "+": ("thumb up", {"thumb": "up"}),
    "-": ("thumb down", {"thumb": "down"}),
    **{str(n): (f"rating {n}", {"rating": n}) for n in range(1, 6)},
}


def _say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()  # token pieces come without a newline


def _error(exc: grpc.RpcError) -> None:
    sys.stdout.flush()
    print(f"kaizen chat: {exc.code().name} {exc.details()}", file=sys.stderr, flush=True)


class Keyboard:
    """Reactions are single keys. While they are read, a terminal is in cbreak mode: keys
    arrive one at a time, unechoed, and Ctrl-C still interrupts; a pressed key waits in
    the terminal until read. From a pipe, each key is a line."""

    def __init__(self) -> None:
        self.terminal = sys.stdin.isatty()
        self.saved: list | None = None  # the terminal's own settings, while in cbreak

    def __enter__(self) -> Keyboard:
        if self.terminal:
            fd = sys.stdin.fileno()
            self.saved = termios.tcgetattr(fd)
            tty.setcbreak(fd, termios.TCSANOW)  # TCSANOW: a key typed ahead is kept
        return self

    def __exit__(self, *exc_info) -> None:
        if self.saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self.saved)
            self.saved = None

    def key(self) -> str:
        """One key (a whole line, without its newline, from a pipe). EOFError on Ctrl-D
        or at the end of the pipe."""
        if not self.terminal:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\r\n")
        # os.read, not sys.stdin: input() reads the fd directly, so Python's buffer must
        # never hold a byte. Up to 32 bytes: an arrow key's escape sequence goes as one.
        pressed = os.read(sys.stdin.fileno(), 32).decode(errors="replace")
        if pressed in ("", "\x04"):  # Ctrl-D (cbreak passes it through as a byte)
            raise EOFError
        return pressed[0]

    def line(self, prompt: str) -> str:
        """A line of text, typed as usual (echoed, editable), in the middle of the keys."""
        saved = self.saved is not None
        self.__exit__()
        try:
            return input(prompt)
        finally:
            if saved:
                self.__enter__()


class Session:
    """One conversation at a time: its messages so far, and the keys after each answer."""

    def __init__(self, client: Client, user_id: str, sampling: dict[str, object]) -> None:
        self.client = client
        self.user_id = user_id
        self.sampling = sampling  # max_new_tokens, temperature; None = the server's default
        self.history: list[dict[str, str]] = []

    def run(self) -> int:
        """Until Ctrl-D or /quit: 0."""
        try:
            self._loop()
        except EOFError:
            _say()
        return 0

    def _loop(self) -> None:
        typed: str | None = None  # a question typed where a key was expected (from a pipe)
        while True:
            question = (typed if typed is not None else input("> ")).strip()
            typed = None
            if question == "/quit":
                return
            if question == "/new":
                self.history = []
                _say("(a new conversation)")
                continue
            if not question:
                continue
            messages = [*self.history, {"role": "user", "content": question}]
            answer = self._answer(messages)
            while answer is not None:
                self.history = [*messages, {"role": "assistant", "content": answer.text}]
                regenerate, typed = self._react(answer)
                answer = self._answer(messages) if regenerate else None

    def _answer(self, messages: list[dict[str, str]]) -> Answer | None:
        """Stream the answer to the screen; None (and a line saying why) when it failed."""
        wrote = False
        try:
            for item in self.client.stream(messages, self.user_id, **self.sampling):
                if isinstance(item, Answer):
                    _say()
                    _say(
                        f"-- {item.model_version} ({item.finish_reason}, "
                        f"{item.completion_tokens} tokens)"
                    )
                    return item
                _say(item, end="")
                wrote = True
        except grpc.RpcError as exc:
            if wrote:
                _say()
            _error(exc)
        except KeyboardInterrupt:  # the stream is cancelled: the server logs nothing
            _say("\n(stopped)")
        return None

    def _react(self, answer: Answer) -> tuple[bool, str | None]:
        """Read keys until one moves on. Returns (regenerate?, the next question when a
        line that is no key was typed instead)."""
        with Keyboard() as keyboard:
            _say(KEYS)
            while True:
                key = keyboard.key()
                if key in SIGNALS:
                    what, signal = SIGNALS[key]
                    self._send(answer, what, **signal)
                elif key in ("c", "e"):
                    what = "comment" if key == "c" else "correction"
                    text = keyboard.line(f"{what}: ").strip()
                    if text:
                        self._send(answer, what, **{what: text})
                elif key == "r":
                    self._send(answer, "regenerate", regenerate=True)
                    return True, None
                else:
                    return False, key if key and not keyboard.terminal else None

    def _send(self, answer: Answer, what: str, **signal: object) -> None:
        try:
            ack = self.client.feedback(answer.response_id, self.user_id, **signal)
        except grpc.RpcError as exc:
            _error(exc)
            return
        _say(f"{what}: stored" + (", replacing your earlier one" if ack.superseded else ""))


def _chat(args) -> int:
    try:
        credential, root_ca = connection_options(args, dict(os.environ))
    except (ValueError, OSError) as exc:
        print(f"kaizen chat: {exc}", file=sys.stderr)
        return 2
    with Client(args.target, credential, root_ca=root_ca) as client:
        try:
            served = client.serving(timeout_s=CONNECT_TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"kaizen chat: {args.target}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
        versions = ", ".join(f"{v} {state}" for state, v in served.items())
        _say(f"kaizen chat: {args.target} ({versions}). Ctrl-D or /quit leaves, /new restarts.")
        if sys.stdin.isatty():
            import readline  # noqa: F401 - line editing and history for input()
        sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        return Session(client, args.user, sampling).run()


def add_parser(commands) -> None:
    chat = commands.add_parser(
        "chat",
        help="chat with a running server in the terminal and rate its answers with one key",
        description="An interactive chat with a running `kaizen serve`: answers stream in, "
        "then one key sends feedback on them (+/- thumb, 1-5 rating, c comment, "
        "e correction, r regenerate; Enter for the next question). Ctrl-D or /quit leaves. "
        f"The credential comes from --key-file or ${CREDENTIAL_ENV} (scopes chat, feedback).",
    )
    add_connection_options(chat, "the API key or user token")
    chat.add_argument(
        "--user",
        default="",
        help="the user id you chat and rate as (default: empty, which is a user token's own "
        "user; give one with an API key)",
    )
    chat.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer in tokens (default: the server's --default-max-new-tokens)",
    )
    chat.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 is greedy, at most 2 (default: the server's --default-temperature)",
    )
    chat.set_defaults(func=_chat)
