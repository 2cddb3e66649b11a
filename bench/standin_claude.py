#!/usr/bin/env python3
"""A stand-in for `claude` used ONLY by the scheduling-efficiency benchmark: it speaks just
enough stream-json (init, one assistant message, result) and sleeps for the duration
written in its prompt as `sleep=<seconds>`, so that scheduling can be measured with exact,
scripted task durations. Every end-to-end claim elsewhere uses the real CLI."""

import json
import re
import sys
import time
import uuid


def main(argv: list[str]) -> int:
    if "--version" in argv:
        print("2.1.332 (Claude Code stand-in)")
        return 0
    prompt = argv[argv.index("--") + 1] if "--" in argv else ""
    session = next((a.split("=", 1)[1] for a in argv if a.startswith("--session-id=")), str(uuid.uuid4()))
    found = re.search(r"sleep=([0-9.]+)", prompt)
    duration = float(found.group(1)) if found else 0.0
    emit = lambda obj: print(json.dumps(obj), flush=True)  # noqa: E731
    emit({"type": "system", "subtype": "init", "session_id": session, "model": "stand-in", "tools": []})
    time.sleep(duration)
    with open(f"out-{session}.txt", "w") as out:  # something to commit and merge
        out.write(prompt + "\n")
    emit(
        {
            "type": "assistant",
            "message": {"id": f"msg_{uuid.uuid4().hex}", "content": [{"type": "text", "text": "done"}]},
        }
    )
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "result": "done",
            "num_turns": 1,
            "session_id": session,
            "total_cost_usd": 0.0,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
