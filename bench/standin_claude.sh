#!/bin/sh
# A stand-in for `claude` used ONLY by the scheduling-efficiency benchmark (bench_engine.py):
# it speaks just enough stream-json (init, one assistant message, result), sleeps for the
# duration written in its prompt as `sleep=<seconds>`, and writes one file to commit, so
# that scheduling is measured with exact scripted durations. POSIX sh: it starts in ~2 ms,
# where a Python stand-in took 100-300 ms. Every end-to-end claim uses the real CLI.
session=standin
prompt=
while [ $# -gt 0 ]; do
  case "$1" in
    --version) echo "2.1.332 (Claude Code stand-in)"; exit 0 ;;
    --session-id=*) session="${1#--session-id=}" ;;
    --) shift; prompt="$1"; break ;;
  esac
  shift
done
duration=0
case "$prompt" in
  *sleep=*) duration="${prompt##*sleep=}"; duration="${duration%%[!0-9.]*}" ;;
esac
printf '{"type":"system","subtype":"init","session_id":"%s","model":"stand-in","tools":[]}\n' "$session"
sleep "$duration"
printf '%s\n' "$prompt" > "out-$session.txt"
printf '{"type":"assistant","message":{"id":"msg_%s","content":[{"type":"text","text":"done"}]}}\n' "$session"
printf '{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":1,"session_id":"%s","total_cost_usd":0,"usage":{"input_tokens":1,"output_tokens":1}}\n' "$session"
