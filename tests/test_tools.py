"""Tool calls: rendering through chat templates (checked against transformers'
``apply_chat_template``), parsing whole and streamed replies, checking tools and
``tool_choice``, and the JSON Schema of a forced call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from lmx.errors import InvalidOptionError
from lmx.generate.tools import (
    ToolCallParser,
    ToolChoice,
    forced_call_schema,
    parse_tool_calls,
    parse_tool_choice,
    plan_tools,
    validate_tools,
)
from lmx.models.gemma3_text import CHAT_TEMPLATE as GEMMA3_TEMPLATE
from lmx.tokenizer import Tokenizer, load_tokenizer

# Qwen 3's chat template as the Hugging Face checkpoints ship it (tests/test_tokenizer.py has it
# without the two sentences the real one has in its tools section).
from test_tokenizer import QWEN_TEMPLATE as _QWEN_BASE

QWEN3_TEMPLATE = _QWEN_BASE.replace(
    "# Tools\\n\\nYou are provided",
    "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided",
).replace(
    '"\\n</tools><|im_end|>\\n"',
    '"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n"',
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
TOOLS = [WEATHER, TIME]

FOLLOW_UP = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "user", "content": "And in F?"},
]


def _model_dir(root: Path, template: str, bos: str | None) -> Path:
    from tiny_models import train_tokenizer

    root.mkdir()
    train_tokenizer().save(str(root / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": "<eos>", "chat_template": template, "add_bos_token": False}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool-templates")
    return {
        "qwen": _model_dir(root / "qwen", QWEN3_TEMPLATE, None),
        "gemma": _model_dir(root / "gemma", GEMMA3_TEMPLATE, "<bos>"),
    }


@pytest.fixture(scope="module")
def toks(dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {k: load_tokenizer(d) for k, d in dirs.items()}


def _hf_render(path: Path, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def _render(tok: Tokenizer, messages: list[dict[str, Any]], tools: Any, choice: Any = None) -> tuple[str, Any]:
    plan = plan_tools(tok, messages, tools, choice, None)
    text = tok.apply_chat_template(plan.messages, add_generation_prompt=True, tools=plan.template_tools)
    return text + plan.prefix, plan


# ---------------------------------------------------------------- rendering
def test_qwen_renders_tools_and_results_as_transformers_does(toks: dict[str, Tokenizer], dirs: dict[str, Path]) -> None:
    tok = toks["qwen"]
    for messages in (FOLLOW_UP[:2], FOLLOW_UP):
        text, plan = _render(tok, messages, TOOLS)
        assert plan.style == "qwen" and plan.template_tools == TOOLS and plan.prefix == ""
        assert text == _hf_render(dirs["qwen"], messages, TOOLS)
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(TIME) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text


def test_qwen_tool_choice_none_required_and_named(toks: dict[str, Tokenizer], dirs: dict[str, Path]) -> None:
    tok = toks["qwen"]
    messages = FOLLOW_UP[:2]
    text, plan = _render(tok, messages, TOOLS, "none")
    assert not plan.parse and plan.template_tools is None
    assert text == _hf_render(dirs["qwen"], messages, None) and "<tools>" not in text
    text, plan = _render(tok, messages, TOOLS, "required")
    assert plan.parse and text == _hf_render(dirs["qwen"], messages, TOOLS) + "<tool_call>\n"
    named = {"type": "function", "function": {"name": "get_time"}}
    text, plan = _render(tok, messages, TOOLS, named)
    assert plan.template_tools == [TIME]  # only the named function is shown
    assert text == _hf_render(dirs["qwen"], messages, [TIME]) + "<tool_call>\n"


def test_gemma_renders_tools_into_the_system_turn(toks: dict[str, Tokenizer], dirs: dict[str, Path]) -> None:
    tok = toks["gemma"]
    text, plan = _render(tok, FOLLOW_UP[:2], TOOLS)
    assert plan.style == "gemma" and plan.template_tools is None
    functions = json.dumps(WEATHER["function"]) + "\n" + json.dumps(TIME["function"])
    assert text == (
        "<bos><start_of_turn>user\nYou are helpful.\n\nYou have access to the following functions:\n"
        f"{functions}\n\nTo call a function, reply with one block per call, in this format and with no other text:\n"
        '```tool_call\n{"name": <function name>, "arguments": <JSON object of the arguments>}\n```\n'
        "Function results come back to you in ```tool_output``` blocks.\n\n"
        "Weather in Paris?<end_of_turn>\n<start_of_turn>model\n"
    )
    # The rewritten conversation renders the same through transformers (the template is the reference).
    assert text == _hf_render(dirs["gemma"], plan.messages, None)


def test_gemma_renders_calls_and_results_as_alternating_turns(
    toks: dict[str, Tokenizer], dirs: dict[str, Path]
) -> None:
    tok = toks["gemma"]
    text, plan = _render(tok, FOLLOW_UP, TOOLS)  # Gemma's template refuses non-alternating turns
    assert text == _hf_render(dirs["gemma"], plan.messages, None)
    assert (
        '<start_of_turn>model\n```tool_call\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
        "<end_of_turn>\n<start_of_turn>user\nResult of get_weather:\n```tool_output\n"
        '{"temp": 21}\n```\n\nAnd in F?<end_of_turn>\n<start_of_turn>model\n'
    ) in text
    # A tool result that ends the conversation is a user turn of its own; Ollama names it tool_name.
    messages = [*FOLLOW_UP[:3], {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]
    text, _ = _render(tok, messages, TOOLS, "required")
    assert text.endswith(
        "<start_of_turn>user\nResult of get_weather:\n```tool_output\nsunny\n```<end_of_turn>\n"
        "<start_of_turn>model\n```tool_call\n"
    )


def test_plain_chats_render_unchanged(toks: dict[str, Tokenizer]) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for tok in toks.values():
        plan = plan_tools(tok, messages, None, None, None)
        assert plan.messages is messages and plan.template_tools is None and plan.prefix == ""


def test_lmx_fallback_qwen_template_renders_tools_as_the_official_one() -> None:
    """lmx.models.qwen3.CHAT_TEMPLATE serves Qwen 3 GGUF files that carry no template."""
    from lmx.models.qwen3 import CHAT_TEMPLATE
    from lmx.tokenizer.chat import compile_chat_template, render_chat_template

    assert "You may call one or more functions" in QWEN3_TEMPLATE and "For each function call" in QWEN3_TEMPLATE
    official, fallback = compile_chat_template(QWEN3_TEMPLATE), compile_chat_template(CHAT_TEMPLATE)
    for messages in (FOLLOW_UP[:2], FOLLOW_UP):
        for tools in (TOOLS, None):
            want = render_chat_template(official, messages, add_generation_prompt=True, tools=tools)
            assert render_chat_template(fallback, messages, add_generation_prompt=True, tools=tools) == want


# ---------------------------------------------------------------- checking
@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ({"type": "function"}, "tools must be a list"),
        (["get_weather"], r"tools\[0\] must be an object"),
        ([{"type": "retrieval", "function": {"name": "f"}}], r"tools\[0\].type must be 'function', got 'retrieval'"),
        ([{"type": "function"}], r"tools\[0\].function must be an object"),
        ([{"type": "function", "function": {"name": "get weather"}}], r"name must be 1-64 .*'get weather'"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "name must be 1-64"),
        ([WEATHER, WEATHER], r"tools\[1\].function.name 'get_weather' is given twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "must be a JSON Schema object"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "got type 'string'"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], "description must be a string"),
    ],
)
def test_bad_tools_are_refused_by_name(tools: Any, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        validate_tools(tools)


def test_tool_choice() -> None:
    assert parse_tool_choice(None, TOOLS) == ToolChoice("auto")
    assert parse_tool_choice("required", TOOLS) == ToolChoice("required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert parse_tool_choice(named, TOOLS) == ToolChoice("function", "get_time")
    with pytest.raises(InvalidOptionError, match="'get_stock', which is not in tools"):
        parse_tool_choice({"type": "function", "function": {"name": "get_stock"}}, TOOLS)
    with pytest.raises(InvalidOptionError, match="got 'always'"):
        parse_tool_choice("always", TOOLS)
    with pytest.raises(InvalidOptionError, match="tool_choice must be one of"):
        parse_tool_choice({"type": "function", "name": "get_time"}, TOOLS)
    with pytest.raises(InvalidOptionError, match="'required' needs tools"):
        parse_tool_choice("required", [])


# ---------------------------------------------------------------- parsing
def _calls(calls: list[Any]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


QWEN_REPLIES = [
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n',
        "Let me check.\n",
        [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})],
    ),
    ("No call: a < b and <tool> tags.", "No call: a < b and <tool> tags.", []),
    ('<tool_call>\n{"name": broken}\n</tool_call> after', '<tool_call>\n{"name": broken}\n</tool_call> after', []),
    ('<tool_call>["get_weather"]</tool_call>', '<tool_call>["get_weather"]</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", {"a": 1})]),
    ('<tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call> Done.', " Done.", [("f", {"a": [1, 2]})]),
    ('<tool_call>\n{"name": "f", "arguments": {}}', "", [("f", {})]),  # cut off before its closing tag
    ('<tool_call>\n{"name": "f", "argu', '<tool_call>\n{"name": "f", "argu', []),
    (
        '<think>\nhm\n</think>\n\n<tool_call>{"name": "é", "arguments": {"q": "😀"}}</tool_call>',
        "<think>\nhm\n</think>\n\n",
        [("é", {"q": "😀"})],
    ),
]
GEMMA_REPLIES = [
    (
        '```tool_call\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    ("Here:\n```python\nprint(1)\n```\n", "Here:\n```python\nprint(1)\n```\n", []),
    (
        'Sure.\n```tool_call\n{"name": "a", "arguments": {}}\n```\n\n```tool_call\n{"name": "b", "arguments": {"x": 1}}\n```',
        "Sure.\n",
        [("a", {}), ("b", {"x": 1})],
    ),
    ("```tool_call\nnot json\n``` tail", "```tool_call\nnot json\n``` tail", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), QWEN_REPLIES)
def test_parse_qwen_replies(text: str, content: str, calls: list[Any]) -> None:
    got, parsed = parse_tool_calls(text, "qwen")
    assert (got, _calls(parsed)) == (content, calls)
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed)
    assert len({c.id for c in parsed}) == len(parsed)


@pytest.mark.parametrize(("text", "content", "calls"), GEMMA_REPLIES)
def test_parse_gemma_replies(text: str, content: str, calls: list[Any]) -> None:
    got, parsed = parse_tool_calls(text, "gemma")
    assert (got, _calls(parsed)) == (content, calls)


def test_parse_with_prefix_and_unknown_style() -> None:
    content, calls = parse_tool_calls('{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "qwen", "<tool_call>\n")
    assert (content, _calls(calls)) == ("", [("f", {"a": 1})])
    with pytest.raises(InvalidOptionError, match="style must be one of qwen, gemma, got 'llama'"):
        parse_tool_calls("x", "llama")


def _stream(style: str, pieces: list[str]) -> tuple[str, list[Any]]:
    parser = ToolCallParser(style)
    content, calls = "", []
    for piece in pieces:
        text, done = parser.feed(piece)
        content += text
        calls += done
    text, done = parser.finish()
    return content + text, calls + done


@pytest.mark.parametrize(
    ("style", "text", "content", "calls"),
    [("qwen", *r) for r in QWEN_REPLIES] + [("gemma", *r) for r in GEMMA_REPLIES],
)
def test_streamed_replies_split_anywhere_parse_the_same(style: str, text: str, content: str, calls: list[Any]) -> None:
    got, parsed = _stream(style, list(text))  # one character at a time
    assert (got, _calls(parsed)) == (content, calls)
    for cut in range(len(text) + 1):
        got, parsed = _stream(style, [text[:cut], text[cut:]])
        assert (got, _calls(parsed)) == (content, calls), cut


def test_streaming_holds_back_only_what_may_open_a_call() -> None:
    parser = ToolCallParser("qwen")
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("_c") == ("", [])
    assert parser.feed('all>{"name": "f", "arguments": {}}</tool_call') == ("", [])
    text, calls = parser.feed(">\n")
    assert text == "" and _calls(calls) == [("f", {})]
    assert parser.feed("Bye") == ("\nBye", [])  # whitespace after a call goes out only before more text
    assert parser.finish() == ("", [])
    parser = ToolCallParser("qwen")
    assert parser.feed("a <b>") == ("a <b>", [])


# ---------------------------------------------------------------- forced calls
def test_forced_call_schema_accepts_exactly_valid_calls() -> None:
    schema = forced_call_schema(TOOLS, "get_weather")
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = jsonschema.Draft202012Validator(schema)
    assert ok.is_valid({"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}})
    assert not ok.is_valid({"name": "get_time", "arguments": {"city": "Paris"}})
    assert not ok.is_valid({"name": "get_weather", "arguments": {"unit": "C"}})  # city is required
    assert not ok.is_valid({"name": "get_weather", "arguments": {"city": "Paris", "unit": "K"}})
    assert not ok.is_valid({"name": "get_weather", "arguments": {"city": "P"}, "extra": 1})
    assert not ok.is_valid({"name": "get_weather"})

    any_tool = jsonschema.Draft202012Validator(forced_call_schema(TOOLS, None))
    assert any_tool.is_valid({"name": "get_time", "arguments": {"zone": "CET"}})
    assert any_tool.is_valid({"name": "get_weather", "arguments": {"city": "Oslo"}})
    assert not any_tool.is_valid({"name": "get_time", "arguments": {"zone": 3}})
    assert not any_tool.is_valid({"name": "get_stock", "arguments": {}})

    bare = forced_call_schema([{"type": "function", "function": {"name": "ping"}}], None)
    assert bare["properties"]["name"] == {"const": "ping"}
    assert jsonschema.Draft202012Validator(bare).is_valid({"name": "ping", "arguments": {}})


def test_forced_call_schema_refuses_unknown_names() -> None:
    with pytest.raises(InvalidOptionError, match="function 'get_stock' is not in tools \\(get_weather, get_time\\)"):
        forced_call_schema(TOOLS, "get_stock")
    with pytest.raises(InvalidOptionError, match="needs tools"):
        forced_call_schema([], None)
