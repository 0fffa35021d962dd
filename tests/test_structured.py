"""JSON answers (`structured`): formats read from what callers send, replies read against a schema, the schema
told to the model, and `DiffGemma.chat(json_schema=...)` drawing again until a reply reads."""

import json

import pydantic
import pytest

from diffgemma import DiffGemmaError
from diffgemma.structured import ChoiceFormat, JsonFormat, RegexFormat, json_format, unfenced, vllm_format

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_formats_in_every_shape_callers_send():
    assert json_format(None, "f") is None and json_format({"type": "text"}, "f") is None
    assert json_format(False, "f") is None
    assert json_format(True, "f") == JsonFormat() == json_format({"type": "json_object"}, "f")
    chat = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    responses = {"type": "json_schema", "name": "person", "schema": PERSON, "description": "who"}
    assert json_format(chat, "f") == JsonFormat(PERSON, "person")
    assert json_format(responses, "f") == JsonFormat(PERSON, "person", "who")
    assert json_format(PERSON, "f") == JsonFormat(PERSON)  # a bare schema
    assert json_format({"type": ["integer", "null"]}, "f").schema == {"type": ["integer", "null"]}


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs its `schema`"),
        ({"type": "json_schema", "schema": {"type": "objekt"}}, "not a valid JSON schema"),
        ({"type": "integer", "minimum": "zero"}, "not a valid JSON schema"),
        ({"type": "yaml"}, "unknown format type 'yaml'"),
        ({"response_format": {"type": "json_object"}}, "the format itself"),
        ("json", "expected a JSON schema or a response format object"),
        ({"type": "object", "properties": {"a": {"const": {1, 2}}}}, "a JSON schema must be JSON"),  # (a set)
    ],
)
def test_a_format_that_is_not_one_says_where_and_why(spec, fault):
    with pytest.raises(DiffGemmaError, match="response_format") as err:
        json_format(spec, "response_format")
    assert fault in str(err.value)


def test_replies_are_read_as_json_and_checked_against_the_schema():
    person = JsonFormat(PERSON)
    assert person.read('{"name": "Ada", "age": 36}') == {"name": "Ada", "age": 36}
    fenced = '\n```json\n{"name": "Ada", "age": 36}\n```\n'
    assert person.read(fenced) == {"name": "Ada", "age": 36}
    assert unfenced(fenced) == '{"name": "Ada", "age": 36}'
    assert unfenced("  [1, 2]\n") == "[1, 2]"
    for reply, fault in [
        ("Sure! Here it is", "not JSON (Expecting value at character 0; it began 'Sure! Here it is')"),
        ('{"name": "Ada", "age": 36} and more', "not JSON (Extra data"),
        ('{"name": "Ada"}', "at $, 'age' is a required property"),
        ('{"name": "Ada", "age": -1}', "at $.age, -1 is less than the minimum of 0"),
        ('{"name": "Ada", "age": 36, "x": 1}', "Additional properties are not allowed"),
    ]:
        with pytest.raises(DiffGemmaError, match="the answer") as err:
            person.read(reply)
        assert fault in str(err.value)
    with pytest.raises(DiffGemmaError, match="JSON but not an object"):
        JsonFormat().read("[1, 2]")
    assert JsonFormat().read('{"any": ["thing"]}') == {"any": ["thing"]}


def test_a_pydantic_models_strict_schema_reads_its_own_json():
    class Step(pydantic.BaseModel):
        explanation: str
        output: str

    class Solution(pydantic.BaseModel):
        steps: list[Step]
        final_answer: float | None

    schema = Solution.model_json_schema()  # with $defs and $ref, as clients send it
    fmt = json_format({"type": "json_schema", "json_schema": {"name": "Solution", "schema": schema}}, "f")
    answer = Solution(steps=[Step(explanation="add", output="4")], final_answer=4.0)
    assert Solution.model_validate(fmt.read(answer.model_dump_json())) == answer
    with pytest.raises(DiffGemmaError, match=r"at \$\.steps\[0\]"):
        fmt.read('{"steps": [{"explanation": "add"}], "final_answer": 4}')


def test_the_schema_is_told_in_the_system_turn():
    fmt = JsonFormat(PERSON, "person", "who wrote it")
    told = fmt.instruction()
    assert "person (who wrote it)" in told and json.dumps(PERSON) in told
    assert "JSON object" in JsonFormat().instruction()
    user = [{"role": "user", "content": "Who?"}]
    assert fmt.with_instruction(user) == [{"role": "system", "content": told}, *user]
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert fmt.with_instruction(system)[0] == {"role": "system", "content": f"Be brief.\n\n{told}"}
    assert system[0]["content"] == "Be brief."  # the caller's messages are left as they were
    developer = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *user]
    parts = fmt.with_instruction(developer)[0]["content"]
    assert parts == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": told}]


def test_regular_expressions_and_choices_read_whole_answers():
    date = RegexFormat(r"\d{4}-\d{2}-\d{2}")
    assert date.read(" 2026-12-03\n") == "2026-12-03" == date.text(" 2026-12-03\n")
    with pytest.raises(DiffGemmaError, match="does not match"):
        date.read("on 2026-12-03")  # the whole answer, not a part of it
    yes_no = ChoiceFormat(("yes", "no"))
    assert yes_no.read("no ") == "no" and "yes; no" in yes_no.instruction()
    with pytest.raises(DiffGemmaError, match="none of the choices"):
        yes_no.read("maybe")
    assert r"\d{4}" in date.instruction()


def test_vllms_structured_outputs_fields():
    assert vllm_format({}, "f") is None and vllm_format({"structured_outputs": {"json": None}}, "f") is None
    assert (
        vllm_format({"structured_outputs": {"regex": "a+"}}, "f")
        == RegexFormat("a+")
        == vllm_format({"guided_regex": "a+"}, "f")
    )
    assert vllm_format({"guided_choice": ["a", "b"]}, "f") == ChoiceFormat(("a", "b"))
    assert vllm_format({"structured_outputs": {"json": PERSON}}, "f") == JsonFormat(PERSON)
    assert vllm_format({"guided_json": json.dumps(PERSON)}, "f") == JsonFormat(PERSON)
    assert vllm_format({"structured_outputs": {"json_object": True}}, "f") == JsonFormat()
    for fields, fault in [
        ({"guided_grammar": "root ::= 'a'"}, "grammar is not supported"),
        ({"guided_regex": "("}, "not a regular expression"),
        ({"guided_choice": "a"}, "list of texts"),
        ({"guided_json": "{not json"}, "not a JSON schema"),
        ({"guided_json": {"type": "objekt"}}, "not a valid JSON schema"),
        ({"guided_regex": "a", "structured_outputs": {"choice": ["a"]}}, "give one form"),
        ({"structured_outputs": "json"}, "must be an object"),
    ]:
        with pytest.raises(DiffGemmaError, match=fault):
            vllm_format(fields, "structured_outputs")


def test_chat_draws_again_until_the_answer_reads(demo, digits_only_bans):
    integer = JsonFormat({"type": "integer"})
    question = [{"role": "user", "content": "How many?"}]
    banned = digits_only_bans
    told = integer.with_instruction(question)
    replies = [demo.chat(told, seed=seed, banned_tokens=banned, max_new_tokens=16) for seed in range(12)]
    reads = []
    for reply in replies:
        try:
            reads.append(integer.read(reply.content))
        except DiffGemmaError:
            reads.append(None)
    # seeds whose replies do not read (empty) before one whose does: the answer is the last draw
    reading = next(s for s in range(1, 12) if reads[s] is not None and reads[s - 1] is None)
    failing = next(s for s in range(reading, -1, -1) if s == 0 or reads[s - 1] is not None)
    draws = reading - failing + 1  # (at least 2)
    asked = dict(banned_tokens=banned, max_new_tokens=16, json_schema={"type": "integer"})
    got = demo.chat(question, seed=failing, json_tries=draws, **asked)
    assert got.parsed == reads[reading] and got.content == replies[reading].content.strip()
    assert got.result.new_tokens == replies[reading].result.new_tokens
    with pytest.raises(DiffGemmaError, match=f"no JSON answer in {draws - 1} tries; the last: the answer is not JSON"):
        demo.chat(question, seed=failing, json_tries=draws - 1, **asked)
    # an answer cut at the token limit comes back as it is, unread, as OpenAI's does ("length")
    cut = demo.chat(question, seed=reading, **{**asked, "max_new_tokens": 1})
    assert cut.result.reached_limit == [True] and cut.parsed is None and len(cut.result.new_tokens[0]) == 1
    for tries in (0, 1.5, True):
        with pytest.raises(DiffGemmaError, match="json_tries must be a positive integer"):
            demo.chat(question, json_tries=tries, **asked)
    with pytest.raises(DiffGemmaError, match="prefill gives the answer's start"):
        demo.chat(question, prefill="{", **asked)
