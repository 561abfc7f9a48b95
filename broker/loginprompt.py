"""What a waiting login asks or says: another profile than the live session's, a busy
partition's forecast, and ^C.

A session is keyed by (user, project); its profile is an attribute. A login that names
another profile than the one running gets, on a terminal, three choices: keep the live
session (nothing is lost), end it and start the profile asked for, or cancel. Commands and
file transfers cannot ask and are refused in one line instead (the broker's answer).

A busy partition (:func:`ask_busy`): the broker shows SLURM's forecast and asks the login
that is making the session whether to go on and wait, take another allowed profile, or
cancel (nothing is submitted yet).

^C while the session is being created: :func:`cancel_wait` tells the broker, which cancels
the job if this login submitted it and no other login waits for it, and answers in one line.

Standard library only: this runs inside ``sbroker login`` on the SSH login path, and only
when the question arises.
"""

from __future__ import annotations

import os
import sys

if False:  # for type checkers only: typing costs every SSH login time
    from collections.abc import Callable

#: What each answer asks the broker for (``ensure``'s ``mismatch`` field).
ANSWERS = {"k": "keep", "e": "replace", "c": None, "": "keep"}
QUESTION = ("  [k] keep the running session (default)\r\n"
            "  [e] end it (everything running in it stops) and start the profile you asked for\r\n"
            "  [c] cancel\r\n"
            "choice [k/e/c]: ")


def ask(message: str, read_line: Callable[[], str], write: Callable[[str], None]) -> str | None:
    """The ``mismatch`` answer to send (``keep``/``replace``) or None to cancel; asks again,
    at most three times, on anything but k, e, c or Enter (then it cancels)."""
    write(f"sbroker: {message}\r\n")
    for _ in range(3):
        write(QUESTION)
        line = read_line()
        if line == "":  # end of input: nobody to ask
            return None
        answer = line.strip().lower()[:1]
        if answer in ANSWERS:
            return ANSWERS[answer]
        write("sbroker: please answer k, e or c\r\n")
    return None


def _read_line() -> str:
    """One line from the terminal on stdin (cooked mode: sshd's pty echoes and edits)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 256:
        chunk = os.read(0, 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace") or ""


def retry_after_mismatch(path: str, message: str, fields: dict[str, object], progress: object,
                         run: Callable[[dict[str, object]], int]) -> int:
    """Ask, then send ``ensure`` again with the answer; run the terminal it gets."""
    from .client import BrokerError, Client

    def write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    choice = ask(message, _read_line, write)
    if choice is None:
        write("sbroker: cancelled; the running session is untouched\r\n")
        return 1
    try:
        with Client(path, require_root=True) as client:
            result = client.request("ensure", on_progress=progress, on_question=ask_busy,
                                    **{**fields, "mismatch": choice})
    except BrokerError as exc:
        getattr(progress, "done", lambda: None)()
        write(f"sbroker: {exc.message}\n")
        return 1
    getattr(progress, "done", lambda: None)()
    return run(result["exec"])  # type: ignore[arg-type]


def cancel_wait(client: object) -> str:
    """Send ``cancel`` on the waiting ``ensure`` connection and return the broker's one line
    (further ^C are ignored meanwhile: the answer comes within the scancel's time)."""
    import signal

    from .client import BrokerError

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        client.sock.settimeout(60)  # type: ignore[attr-defined]
        client.send({"type": "cancel"})  # type: ignore[attr-defined]
        while True:
            message = client.recv()  # type: ignore[attr-defined]
            if message.get("type") == "error":
                return str(message.get("message", "cancelled"))
            if message.get("type") == "result":
                return "cancelled (the session was ready; it stays)"
    except (BrokerError, OSError):
        return "cancelled (the broker did not confirm; see sbroker ls)"


def busy_choice(question: dict[str, object], read_line: Callable[[], str],
                write: Callable[[str], None]) -> str:
    """``go``, an allowed profile's name or ``cancel``: the answer at a busy forecast. Enter
    (or end of input, or three wrong answers) goes on."""
    choices = [c for c in question.get("choices", []) if isinstance(c, str)][:9]  # type: ignore[union-attr]
    write(f"sbroker: {question.get('text', 'the partition is busy')}\r\n")
    write(f"  [g] go on and wait with profile {question.get('profile', '?')} (default)\r\n")
    for number, name in enumerate(choices, 1):
        write(f"  [{number}] start with profile {name} instead\r\n")
    write("  [c] cancel\r\n")
    for _ in range(3):
        write(f"choice [g{'/1-' + str(len(choices)) if choices else ''}/c]: ")
        line = read_line()
        if line == "":
            return "go"
        answer = line.strip().lower()
        if answer in ("", "g"):
            return "go"
        if answer == "c":
            return "cancel"
        if answer.isdigit() and 1 <= int(answer) <= len(choices):
            return choices[int(answer) - 1]
        write("sbroker: please answer g, c or a number from the list\r\n")
    return "go"


def ask_busy(question: dict[str, object]) -> str:
    """:func:`busy_choice` on this login's terminal."""
    def write(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    return busy_choice(question, _read_line, write)
