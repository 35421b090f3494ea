"""`kaizen chat` as a person uses it: a subprocess on a pseudo-terminal (or a pipe) that
talks to an in-process server over loopback."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60.0  # for each thing we wait to see: generous, for a slow shared machine


def chat_command(server, *args: str) -> list[str]:
    target = f"127.0.0.1:{server.port}"
    return [sys.executable, "-m", "kaizen.cli", "chat", "--target", target, *args]


def chat_env(api_key: str) -> dict[str, str]:
    # TERM=dumb: readline writes no escape sequences into what the test reads
    return {**os.environ, "KAIZEN_API_KEY": api_key, "TERM": "dumb"}


class Screen:
    """What the chat wrote to its terminal, read as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        self.pos = 0  # everything before it was already expected

    def expect(self, wanted: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while wanted not in self.text[self.pos :]:
            left_s = deadline - time.monotonic()
            assert left_s > 0, f"never saw {wanted!r}; the screen: {self.text!r}"
            if select.select([self.fd], [], [], left_s)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the chat closed the terminal
                    data = b""
                assert data, f"the chat ended before {wanted!r}; the screen: {self.text!r}"
                self.text += data.decode(errors="replace").replace("\r\n", "\n")
        self.pos = self.text.index(wanted, self.pos) + len(wanted)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())


def test_chat_on_a_terminal_streams_the_answer_and_sends_a_thumb(server, api_key):
    main, child = os.openpty()
    proc = subprocess.Popen(
        chat_command(server, "--user", "u-chat", "--max-new-tokens", "8"),
        stdin=child,
        stdout=child,
        stderr=child,
        env=chat_env(api_key),
        cwd=ROOT,
    )
    os.close(child)
    screen = Screen(main)
    try:
        screen.expect("(v0 serving)")
        screen.expect("> ")
        screen.type("What is the capital of France?\r")
        screen.expect("-- v0 (")
        screen.expect("keys: + good")
        screen.type("+")  # one key, no Enter
        screen.expect("thumb up: stored")
        [sample] = server.buffer.read_samples(0, 10)
        assert str(sample.feedback.kind) == "thumb" and sample.feedback.value == 1.0
        assert sample.feedback.user_id == "u-chat" and sample.generation.user_id == "u-chat"
        answered = screen.text[: screen.text.index("-- v0 (")]
        assert sample.generation.text in answered  # the tokens were on the screen
        screen.type("\r")  # Enter: the next question
        screen.expect("> ")
        screen.type("\x04")  # Ctrl-D
        assert proc.wait(timeout=TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


def test_chat_from_a_pipe_goes_on_after_an_error(server, api_key):
    lines = [
        "word " * 3000,  # longer than the model's context: INVALID_ARGUMENT, and on we go
        "Hello there",
        "c",
        "too short",  # the comment
        "r",  # regenerate: a second answer to the same question
        "5",  # a rating, on the second answer
        "What next?",  # no key: the next question
        "/quit",
    ]
    done = subprocess.run(
        chat_command(server, "--user", "u-pipe", "--max-new-tokens", "4", "--temperature", "1"),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=chat_env(api_key),
        cwd=ROOT,
        timeout=4 * TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert "kaizen chat: INVALID_ARGUMENT messages: the prompt is" in done.stderr
    assert done.stdout.count("-- v0 (") == 3
    assert "comment: stored" in done.stdout and "rating 5: stored" in done.stdout
    events = {str(s.feedback.kind): s for s in server.buffer.read_samples(0, 10)}
    assert sorted(events) == ["comment", "rating", "regenerate"]
    assert events["comment"].feedback.text == "too short"
    first, second = events["regenerate"].generation, events["rating"].generation
    assert events["comment"].generation.response_id == first.response_id
    assert second.response_id != first.response_id and second.messages == first.messages


def test_chat_exits_1_when_the_server_refuses_the_credential(server):
    done = subprocess.run(
        chat_command(server),
        input="hi\n",
        capture_output=True,
        text=True,
        env=chat_env("kz_nosuchkey_0000"),
        cwd=ROOT,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 1
    assert f"kaizen chat: 127.0.0.1:{server.port}: UNAUTHENTICATED" in done.stderr
