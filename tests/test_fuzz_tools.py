"""Every MCP tool, resource and prompt fuzzed through the SDK's in-memory client.

Arguments come from :mod:`fuzz_inputs`: valid values (real repositories, plan and task ids
of this server) mixed with junk of every JSON type, odd strings (NUL bytes, lone
surrogates, 200 kB, ``../``, absolute paths outside the root, a symlink and a ``.git`` file
pointing out of it, refs starting with ``-``), ids of other plans and unknown fields. Every
call must end in a result or in an ``isError`` result (a JSON-RPC error for resources and
prompts) whose text is clear: no traceback, no internal exception name, not the SDK's bare
"Error executing tool X" that stands for a crash; the server logs no error; and the server
answers a ``status`` listing afterwards. What fuzzing found is kept as explicit cases
(:data:`FOUND`, ``@example``).

One server (:mod:`fuzz_world`) serves the whole module, as it would serve many clients;
examples change its state (plans cancelled, pools resized) in a fixed order. Hypothesis runs
derandomized without a database, so CI sees the same examples every time (``FUZZ_EXAMPLES``
explores more).

Agents: ``plan`` without tasks would start a read-only planning agent, so the strategy only
sends that with a goal the server refuses before planning (blank, NUL, too big); the fuzzed
plans are never dispatched, and ``dispatch`` is fuzzed against plans that cannot start
(cancelled, unknown, odd ids). One kept plan does run: its two agents (real `claude`
against the scripted model) each write a file, then its final merge is fuzzed too.
:func:`test_no_agent_ran_but_the_kept_plans` checks that nothing else reached the model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal
from fuzz_inputs import JUNK, REFS, TEXT, resource_uris
from fuzz_inputs import arguments as arguments_for
from fuzz_world import ErrorLog, World, serving
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult

from claudecluster_mcp.claude_cli import ClaudeBinary

# A failing example holding the 200 kB string is reported all the same.
pytestmark = [pytest.mark.filterwarnings("ignore:Generating overly large repr")]

TOOLS = ["plan", "dispatch", "status", "merge", "cancel", "approve", "logs", "workers"]

#: Examples per tool (each is one call plus a `status` listing). ``FUZZ_EXAMPLES=500``
#: explores further: that many, from a random seed each run (hypothesis prints the
#: failing example and how to reproduce it).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one server for every example, on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

#: A call that takes longer has hung (the machine may be loaded; no fuzzed call waits).
CALL_LIMIT = 30

#: Text that means an internal error leaked out instead of a message for the caller.
LEAK = re.compile(
    r"Traceback|File \"|\b(KeyError|ValueError|TypeError|AttributeError|AssertionError|IndexError|"
    r"RuntimeError|UnicodeEncodeError|UnicodeDecodeError|OSError|FileNotFoundError|NotADirectoryError|"
    r"PermissionError|IsADirectoryError|sqlite3|IntegrityError|OperationalError|ExceptionGroup|"
    r"CancelledError|ClosedResourceError|NoneType|ProgrammingError)\b"
)

#: Pydantic's validation messages name the Python type of the rejected input: not a leak.
PYDANTIC_TYPE = re.compile(r"input_type=\w+")


def leaked(text: str) -> bool:
    """Whether ``text`` shows a traceback or an internal exception."""
    return LEAK.search(PYDANTIC_TYPE.sub("", text)) is not None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, claude: ClaudeBinary) -> Iterator[World]:
    """One server for the module, on an event loop in its own thread: hypothesis draws in
    the (synchronous) tests, calls go through :meth:`World.run`."""
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with start_blocking_portal("asyncio") as portal:
            base = tmp_path_factory.mktemp("fuzz")
            with portal.wrap_async_context_manager(serving(base, claude, errors, portal)) as running:
                yield running
    finally:
        logging.getLogger().removeHandler(errors)


def assert_clear(result: CallToolResult, tool: str) -> None:
    """A result with structured content, or an error a caller can read."""
    texts = [c.text for c in result.content if c.type == "text"]
    assert texts and texts[0].strip(), result
    if not result.is_error:
        assert result.structured_content is not None, result
        return
    text = texts[0]
    assert text.strip() != f"Error executing tool {tool}", "a crash (its details are in the server log)"
    assert not leaked(text), text


def call(world: World, tool: str, arguments: dict[str, Any]) -> CallToolResult:
    """Call ``tool``; it must answer clearly, log no error, and leave the server answering."""

    async def check(world: World) -> CallToolResult:
        with anyio.fail_after(CALL_LIMIT):
            result = await world.client.call_tool(tool, arguments)
            assert_clear(result, tool)
            await still_answering(world)
        return result

    result = world.run(check)
    if currently_in_test_context():
        event(outcome(result))  # see them with --hypothesis-show-statistics
    return result


def encodable(text: str) -> bool:
    """The SDK's client cannot send a tool or prompt name or a resource URI holding a lone
    surrogate (it puts them in a header and fails on its own side), and no JSON transport
    parses one (pydantic-core refuses it): only in-process callers can pass one, in
    arguments, which the fuzzed arguments do."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NAMES = TEXT.filter(encodable)


def outcome(result: CallToolResult) -> str:
    """What kind of answer ``result`` is: a result, rejected arguments, or a domain error."""
    if not result.is_error:
        return "result"
    text = result.content[0].text if result.content and result.content[0].type == "text" else ""
    if re.search("validation errors? for", text):
        return "invalid arguments"
    return "error: " + text.partition(": ")[2][:25]


async def still_answering(world: World) -> None:
    """The server lists its plans."""
    listing = await world.client.call_tool("status", {})
    assert not listing.is_error and listing.structured_content, listing.content


@pytest.mark.parametrize("tool", [t for t in TOOLS if t != "dispatch"])
@FUZZ
@given(data=st.data())
def test_every_tool_answers_fuzzed_arguments_clearly(world: World, tool: str, data: st.DataObject) -> None:
    arguments = data.draw(world.known.tool_arguments(tool), label="arguments")
    call(world, tool, arguments)


@FUZZ
@given(data=st.data())
def test_dispatch_of_plans_that_cannot_start(world: World, data: st.DataObject) -> None:
    startable = world.known.plans[1]  # planned, unless a fuzzed `cancel` got it
    arguments = data.draw(world.known.tool_arguments("dispatch").filter(lambda a: a.get("plan_id") != startable))
    call(world, "dispatch", arguments)


def one_task(**fields: Any) -> list[dict[str, Any]]:
    return [{"id": "a", "prompt": "x", **fields}]


#: What fuzzing found: each crashed the server (a bare "Error executing tool X" and a
#: logged traceback) or did something it should have refused. (tool, arguments of a world,
#: what the error must say.)
FOUND: list[tuple[str, Callable[[World], dict[str, Any]], str]] = [
    ("plan", lambda w: {"goal": "g", "repo": w.known.valid_repos[0] + "\x00", "tasks": one_task()}, "repo holds a NUL"),
    ("plan", lambda w: {"goal": "g", "repo": "~nobody-here", "tasks": one_task()}, "as a repository path"),
    ("plan", lambda w: {"goal": "g", "repo": "x" * 5000, "tasks": one_task()}, "File name too long"),
    ("plan", lambda w: {"goal": "\ud800", "tasks": one_task()}, "goal is not valid UTF-8"),
    ("plan", lambda w: {"goal": "g", "tasks": one_task(prompt="x\x00y")}, "tasks[0].prompt holds a NUL"),
    (
        "plan",
        lambda w: {"goal": "g", "repo": w.known.valid_repos[0], "tasks": one_task(), "base_ref": "main\x00"},
        "base_ref holds a NUL",
    ),
    ("status", lambda w: {"plan_id": "\ud800"}, "plan_id is not valid UTF-8"),
    ("merge", lambda w: {"plan_id": w.known.plans[0], "target": "HEAD"}, "cannot merge into 'HEAD'"),
    (
        "plan",
        lambda w: {
            "goal": "g",
            "repo": w.known.valid_repos[0],
            "tasks": one_task(),
            "target": f"claudecluster/{w.known.plans[0]}/integration",
        },
        "branches under claudecluster/ belong to the engine",
    ),
    ("status", lambda w: {"plan_id": w.known.plans[0], "task_id": w.known.tasks[-1]}, "is not in plan"),
]


@pytest.mark.parametrize(("tool", "arguments", "message"), FOUND, ids=[message for _, _, message in FOUND])
def test_what_fuzzing_found_gets_a_clear_error(
    world: World, tool: str, arguments: Callable[[World], dict[str, Any]], message: str
) -> None:
    result = call(world, tool, arguments(world))

    assert result.is_error and message in result.content[0].text, result.content  # type: ignore[union-attr]


@FUZZ
@given(name=st.one_of(st.sampled_from(["nope", "Plan", "plan ", "status\x00", ""]), NAMES), arguments=JUNK)
def test_unknown_tools_and_non_object_arguments(world: World, name: str, arguments: Any) -> None:
    async def check(world: World) -> None:
        with anyio.fail_after(CALL_LIMIT):
            result = await world.client.call_tool(name, arguments if isinstance(arguments, dict) else None)
            assert result.is_error and not leaked(str(result.content)), result
            await still_answering(world)

    if name not in TOOLS:
        world.run(check)


@FUZZ
@given(data=st.data())
def test_resources_answer_odd_uris_with_a_result_or_a_clear_error(world: World, data: st.DataObject) -> None:
    uri = data.draw(resource_uris(world.known).filter(encodable), label="uri")

    async def check(world: World) -> None:
        with anyio.fail_after(CALL_LIMIT):
            try:
                read = await world.client.read_resource(uri)
            except MCPError as exc:
                assert exc.error.code in (-32602, -32603), exc.error
                assert not leaked(exc.error.message), exc.error.message
                assert "Error creating resource" not in exc.error.message, "a crash (details in the server log)"
            else:
                assert read.contents
            await still_answering(world)

    world.run(check)


@FUZZ
@given(
    name=st.one_of(st.just("split_goal"), NAMES),
    arguments=st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["goal", "repo", "other", ""]), TEXT, max_size=3),
        st.fixed_dictionaries({"goal": TEXT}, optional={"repo": TEXT}),
    ),
)
@example(name="split_goal", arguments=None).via("regression: 'Internal server error' and a logged traceback")
@example(name="split_goal", arguments={"goal": "g", "other": "x"}).via("regression: 'Internal server error'")
@example(name="nope", arguments={"goal": "g"}).via("regression: 'Internal server error' and a logged traceback")
def test_prompts_answer_odd_arguments_with_a_result_or_a_clear_error(
    world: World, name: str, arguments: dict[str, str] | None
) -> None:
    async def check(world: World) -> None:
        with anyio.fail_after(CALL_LIMIT):
            try:
                prompt = await world.client.get_prompt(name, arguments)
            except MCPError as exc:
                assert exc.error.code == -32602, exc.error
                message = exc.error.message
                assert re.match(r"unknown prompt|the prompt 'split_goal' (needs|has no) argument", message), message
            else:
                assert name == "split_goal" and prompt.messages
            await still_answering(world)

    world.run(check)


@pytest.mark.claude
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_dispatch_fuzzed_against_a_plan_that_can_run(world: World, data: st.DataObject) -> None:
    """The kept plan can start: its two agents run real `claude` against the scripted model,
    each writing one file; the fuzzer may dispatch it (or some of its tasks) any number of
    times, with junk alongside."""
    arguments = data.draw(
        world.known.tool_arguments("dispatch").map(lambda a: {**a, "plan_id": world.runnable}), label="arguments"
    )
    call(world, "dispatch", arguments)


async def finish(world: World) -> dict[str, Any]:
    """The kept plan's status once it has finished (dispatched here if no example did)."""
    await world.client.call_tool("dispatch", {"plan_id": world.runnable})
    return await call_ok(world, "status", plan_id=world.runnable, wait_seconds=120, until_finished=True)


@pytest.mark.claude
def test_the_dispatched_plan_finishes_with_each_task_merged_once(world: World) -> None:
    done = world.run(finish)

    assert {t["id"]: t["state"] for t in done["tasks"]} == {"a": "merged", "b": "merged"}, done["tasks"]


@pytest.mark.claude
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_merge_fuzzed_on_a_finished_plan(world: World, data: st.DataObject) -> None:
    """Real final merges of the finished plan into fuzzed targets: new branches, the checked
    out branch, HEAD, the engine's own branches, odd and junk names."""
    world.run(finish)  # at once when it has
    targets = st.one_of(REFS, st.sampled_from(["main", "HEAD", f"claudecluster/{world.runnable}/integration"]))
    arguments = data.draw(
        arguments_for(("plan_id",), plan_id=st.just(world.runnable), target=targets, dry_run=st.booleans()).map(
            lambda a: {**a, "plan_id": world.runnable}
        ),
        label="arguments",
    )
    result = call(world, "merge", arguments)
    target = arguments.get("target")
    if target == "HEAD" or (isinstance(target, str) and target.startswith("claudecluster/")):
        assert result.is_error, result.structured_content


async def call_ok(world: World, tool: str, **arguments: Any) -> dict[str, Any]:
    """``tool``'s structured result (it must not fail)."""
    result = await world.client.call_tool(tool, arguments)
    assert not result.is_error and result.structured_content is not None, result.content
    return result.structured_content


def test_no_agent_ran_but_the_kept_plans(world: World) -> None:
    """The fuzzed calls never started an agent (a planning run, or a fuzzed plan's tasks):
    the model only ever saw the kept plan's two tasks."""
    conversations = {r.rule for r in world.model.requests if r.path == "/v1/messages"}
    assert conversations <= {"a", "b"}, conversations
