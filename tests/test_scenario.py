"""Scenario files: loading YAML/JSON, validation messages, and rule matching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster_mcp.errors import ConfigError, ScenarioError
from claudecluster_mcp.scenario import Fault, Scenario, Storm, ToolCall, Turn, load_scenario

YAML_SCENARIO = """\
name: demo
default_latency: 0.25
storm:
  requests: 2
  fault: {type: overloaded}
rules:
  - name: write-hello
    match: "write hello"
    turns:
      - text: "Writing the file."
        latency: 0.5
        tools:
          - name: Write
            input:
              file_path: "{cwd}/hello.py"
              content: "print('hi')\\n"
      - text: "Done."
        input_tokens: 1200
        output_tokens: 34
  - name: flaky
    regex: "fix (?P<module>\\\\w+)\\\\.py"
    turns:
      - fault: {type: rate_limit, retry_after: 2, times: null, message: slow down}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _rule(name: str = "r", **fields: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": name, "match": "x", "turns": [{"text": "ok"}]}
    rule.update(fields)
    return rule


def _invalid(data: Any) -> str:
    """Load ``data`` expecting a ScenarioError; return its message."""
    with pytest.raises(ScenarioError) as info:
        load_scenario(data)
    return str(info.value)


# -- loading ------------------------------------------------------------------------------


def test_load_yaml_file(tmp_path: Path) -> None:
    scenario = load_scenario(_write(tmp_path, "demo.yaml", YAML_SCENARIO))

    assert scenario.name == "demo"
    assert scenario.default_latency == 0.25
    assert scenario.storm == Storm(requests=2, fault=Fault(type="overloaded"))
    assert [rule.name for rule in scenario.rules] == ["write-hello", "flaky"]

    first, second = scenario.rules[0].turns
    assert first.text == "Writing the file."
    assert first.latency == 0.5
    assert first.tools == [ToolCall(name="Write", input={"file_path": "{cwd}/hello.py", "content": "print('hi')\n"})]
    assert first.fault is None
    assert (second.input_tokens, second.output_tokens) == (1200, 34)

    flaky = scenario.rules[1]
    assert flaky.match is None
    assert flaky.regex == r"fix (?P<module>\w+)\.py"
    fault = flaky.turns[0].fault
    assert fault == Fault(type="rate_limit", retry_after=2, times=None, message="slow down")


def test_load_yml_and_str_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "demo.yml", YAML_SCENARIO)
    assert load_scenario(str(path)).name == "demo"


def test_load_json_file(tmp_path: Path) -> None:
    data = {
        "name": "from-json",
        "rules": [
            {
                "name": "only",
                "match": "hello",
                "turns": [{"tools": [{"name": "Bash", "input": {"command": "ls"}}]}],
            }
        ],
    }
    scenario = load_scenario(_write(tmp_path, "s.json", json.dumps(data)))
    assert scenario.name == "from-json"
    assert scenario.rules[0].turns[0].tools[0] == ToolCall(name="Bash", input={"command": "ls"})


def test_load_dict_equals_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "demo.yaml", YAML_SCENARIO)
    assert load_scenario(yaml.safe_load(YAML_SCENARIO)) == load_scenario(path)


def test_defaults() -> None:
    scenario = load_scenario({"rules": [{"name": "r", "match": "x", "turns": [{"text": "t"}]}]})
    assert scenario.name == "scenario"
    assert scenario.storm is None
    assert scenario.default_latency == 0.0
    turn = scenario.rules[0].turns[0]
    assert turn == Turn(text="t")
    assert turn.tools == []
    assert turn.latency is None  # falls back to the scenario default_latency
    assert turn.fault is None
    assert turn.input_tokens is None and turn.output_tokens is None

    fault = Fault(type="hang")
    assert fault.retry_after == 1.0
    assert fault.seconds == 3600.0
    assert fault.times == 1
    assert fault.message is None

    assert ToolCall(name="Read").input == {}


def test_models_are_frozen() -> None:
    scenario = load_scenario({"rules": [_rule()]})
    with pytest.raises(Exception, match="frozen"):
        scenario.name = "changed"


# -- file-level errors --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = _invalid(missing)
    assert "cannot read scenario" in message
    assert str(missing) in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "rules: [\n  - name: a\n    match: {unclosed\n")
    message = _invalid(path)
    assert str(path) in message
    assert "not valid YAML/JSON" in message


def test_invalid_json(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.json", '{"rules": [}')
    message = _invalid(path)
    assert str(path) in message
    assert "not valid YAML/JSON" in message


@pytest.mark.parametrize("text", ["- just\n- a list\n", "just a string\n", ""])
def test_non_mapping_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "list.yaml", text)
    message = _invalid(path)
    assert str(path) in message
    assert "must be a mapping" in message


def test_scenario_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_scenario(tmp_path / "absent.yaml")


# -- validation errors --------------------------------------------------------------------


def test_rule_with_both_match_and_regex() -> None:
    message = _invalid({"rules": [_rule("both", regex="x+")]})
    assert "'both'" in message
    assert "exactly one of 'match' or 'regex'" in message


def test_rule_with_neither_match_nor_regex() -> None:
    message = _invalid({"rules": [_rule("neither", match=None)]})
    assert "'neither'" in message
    assert "exactly one of 'match' or 'regex'" in message


def test_bad_regex() -> None:
    message = _invalid({"rules": [_rule("broken", match=None, regex="fix (unclosed")]})
    assert "'broken'" in message
    assert "bad regex" in message


def test_empty_turns() -> None:
    message = _invalid({"rules": [_rule("empty", turns=[])]})
    assert "rules.0.turns" in message
    assert "at least 1" in message


def test_turn_with_nothing() -> None:
    message = _invalid({"rules": [_rule("hollow", turns=[{"text": "ok"}, {"latency": 1}])]})
    assert "rules.0.turns.1" in message
    assert "a turn needs text, tools or a fault" in message


def test_no_rules() -> None:
    assert "rules" in _invalid({"name": "x", "rules": []})
    assert "rules" in _invalid({"name": "x"})


def test_duplicate_rule_names() -> None:
    message = _invalid({"rules": [_rule("twin"), _rule("other"), _rule("twin")]})
    assert "duplicate rule names: twin" in message


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"rules": [_rule()], "rulez": []}, "rulez"),
        ({"rules": [_rule(matches="y")]}, "rules.0.matches"),
        ({"rules": [_rule(turns=[{"txt": "typo"}])]}, "rules.0.turns.0.txt"),
        (
            {"rules": [_rule(turns=[{"fault": {"type": "cut", "time": 2}}])]},
            "rules.0.turns.0.fault.time",
        ),
        (
            {"rules": [_rule(turns=[{"tools": [{"name": "Bash", "args": {}}]}])]},
            "rules.0.turns.0.tools.0.args",
        ),
    ],
)
def test_unknown_keys(data: dict[str, Any], where: str) -> None:
    message = _invalid(data)
    assert where in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("turn", "where"),
    [
        ({"fault": {"type": "explode"}}, "rules.0.turns.0.fault.type"),
        ({"fault": {"type": "cut", "times": 0}}, "rules.0.turns.0.fault.times"),
        ({"text": "t", "latency": -1}, "rules.0.turns.0.latency"),
        ({"text": "t", "output_tokens": -5}, "rules.0.turns.0.output_tokens"),
        ({"tools": [{"name": ""}]}, "rules.0.turns.0.tools.0.name"),
    ],
)
def test_bad_field_values(turn: dict[str, Any], where: str) -> None:
    assert where in _invalid({"rules": [_rule(turns=[turn])]})


@pytest.mark.parametrize(
    ("storm", "problem"),
    [
        ({"fault": {"type": "cut"}}, "exactly one of 'requests' or 'seconds'"),
        ({"requests": 2, "seconds": 5, "fault": {"type": "cut"}}, "exactly one of 'requests' or 'seconds'"),
        ({"requests": 2, "after": 5, "fault": {"type": "cut"}}, "'after' goes with 'seconds'"),
    ],
)
def test_a_storm_lasts_some_requests_or_some_seconds(storm: dict[str, Any], problem: str) -> None:
    assert problem in _invalid({"rules": [_rule()], "storm": storm})


def test_a_storm_window_hits_requests_by_time() -> None:
    storm = Storm(after=10, seconds=20, fault=Fault(type="rate_limit", retry_after=None))
    assert [storm.hits(n, t) for n, t in [(1, 0), (9, 9.9), (10, 10), (50, 29.9), (51, 30)]] == [
        False,
        False,
        True,
        True,
        False,
    ]


def test_bad_storm() -> None:
    message = _invalid({"rules": [_rule()], "storm": {"requests": 0, "fault": {"type": "cut"}}})
    assert "storm.requests" in message


def test_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "s.yaml", "rules:\n  - name: a\n    turns: [{text: t}]\n")
    message = _invalid(path)
    assert str(path) in message
    assert "'a'" in message


# -- matching -----------------------------------------------------------------------------


def test_find_rule_first_match_wins() -> None:
    scenario = load_scenario(
        {
            "rules": [
                _rule("specific", match="build the parser"),
                _rule("general", match="build"),
                _rule("anything", match=None, regex=""),
            ]
        }
    )
    found = scenario.find_rule("please build the parser now")
    assert found is not None
    assert found[0].name == "specific"
    assert found[1] == {}

    found = scenario.find_rule("build the lexer")
    assert found is not None and found[0].name == "general"

    found = scenario.find_rule("something else")
    assert found is not None and found[0].name == "anything"


def test_find_rule_no_match() -> None:
    scenario = load_scenario({"rules": [_rule("a", match="alpha"), _rule("b", match="beta")]})
    assert scenario.find_rule("gamma") is None
    assert scenario.find_rule("") is None


def test_match_is_case_sensitive_substring() -> None:
    scenario = load_scenario({"rules": [_rule("a", match="Hello World")]})
    assert scenario.find_rule("say Hello World!") is not None
    assert scenario.find_rule("say hello world!") is None


def test_regex_named_groups_are_variables() -> None:
    scenario = load_scenario(
        {
            "rules": [
                _rule(
                    "fix",
                    match=None,
                    regex=r"fix (?P<module>\w+)\.py(?: in (?P<package>\w+))?(?: by (?P<who>\w+))?",
                )
            ]
        }
    )
    found = scenario.find_rule("Task: fix parser.py in core, please")
    assert found is not None
    rule, variables = found
    assert rule.name == "fix"
    # Groups that did not take part in the match are left out, not set to None.
    assert variables == {"module": "parser", "package": "core"}

    assert scenario.find_rule("fix the parser") is None


def test_regex_search_anywhere_and_multiline() -> None:
    scenario = load_scenario({"rules": [_rule("r", match=None, regex=r"(?m)^GOAL: (?P<goal>.+)$")]})
    found = scenario.find_rule("<context>\nstuff\n</context>\nGOAL: add tests\nmore")
    assert found is not None
    assert found[1] == {"goal": "add tests"}


def test_scenario_model_validate_directly() -> None:
    scenario = Scenario.model_validate({"rules": [_rule("direct")]})
    assert scenario.rules[0].variables("xyz") == {}
    assert scenario.rules[0].variables("abc") is None


# -- the documented example ---------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "scenarios.md"


def _doc_scenarios() -> list[str]:
    text = DOCS.read_text(encoding="utf-8")
    blocks = [part.split("```", 1)[0] for part in text.split("```yaml\n")[1:]]
    return [block for block in blocks if "rules:" in block]


def test_documented_example_loads_and_matches() -> None:
    blocks = _doc_scenarios()
    assert blocks, "docs/scenarios.md has no complete YAML scenario"
    scenario = load_scenario(yaml.safe_load(blocks[0]))

    found = scenario.find_rule("<system-reminder>…</system-reminder>\nCreate greet.py now")
    assert found is not None
    rule, _ = found
    assert [[tool.name for tool in turn.tools] for turn in rule.turns] == [
        ["Write"],
        ["Bash", "Read", "Edit"],
        [],
    ]
    assert all(
        tool.input["file_path"].startswith("{cwd}/")
        for turn in rule.turns
        for tool in turn.tools
        if tool.name in ("Write", "Edit", "Read")
    )
    assert rule.turns[-1].fault is not None

    found = scenario.find_rule("Fix the bug in calc.py please")
    assert found is not None
    assert found[0].name == "fix-module"
    assert found[1] == {"module": "calc"}
