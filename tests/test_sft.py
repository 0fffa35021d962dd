"""Chat JSONL through the chat template, and the `train chat` command (full and LoRA, resumable)."""

import json

import pytest
import torch

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.cli import main
from diffgemma.presets import random_checkpoint
from diffgemma.train.data import read_chat_jsonl

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "1, 2, 3."},
        ]
    },
]


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_examples_supervise_from_the_model_turn(tiny, tmp_path):
    tokenizer = tiny.tokenizer
    examples = read_chat_jsonl(_write(tmp_path / "chat.jsonl", CONVERSATIONS), tokenizer, eos_id=1)
    assert len(examples) == 3  # one per assistant turn
    last = examples[-1]
    prompt_text = tokenizer.decode(last.prompt, skip_special_tokens=False)
    response_text = tokenizer.decode(last.response, skip_special_tokens=False)
    # the prompt is exactly what inference renders for the conversation so far
    expected = tokenizer.apply_chat_template(CONVERSATIONS[1]["messages"][:4], add_generation_prompt=True)
    assert prompt_text == expected
    assert "Hello!" in prompt_text and "1, 2, 3." not in prompt_text
    assert response_text.startswith("1, 2, 3.") and "<turn|>" in response_text
    assert last.response[-1] == 1 and len({e.id for e in examples}) == 3


def test_the_other_trl_formats_give_the_same_examples(tiny, tmp_path):
    """Prompt and completion as messages train what the same conversation trains, its completion's turns
    alone; as text, a plain continuation (no template); {"text": ...} answers an empty prompt."""
    tokenizer = tiny.tokenizer
    conversation = CONVERSATIONS[1]["messages"]
    records = [
        {"prompt": conversation[:4], "completion": conversation[4:]},
        {"prompt": "The sky is", "completion": " blue."},
        {"text": "Just text."},
    ]
    examples = read_chat_jsonl(_write(tmp_path / "mixed.jsonl", records), tokenizer, eos_id=1)
    whole = read_chat_jsonl(_write(tmp_path / "chat.jsonl", CONVERSATIONS[1:]), tokenizer, eos_id=1)
    assert (examples[0].prompt, examples[0].response) == (whole[-1].prompt, whole[-1].response)
    assert examples[1].prompt == tokenizer.encode("The sky is")  # as `generate` encodes a text prompt
    assert examples[1].response == [*tokenizer.encode(" blue.", add_special_tokens=False), 1]
    assert examples[2].prompt == tokenizer.encode("") and tokenizer.decode(examples[2].response) == "Just text."
    assert [example.id for example in examples] == [0, 1, 2]


def test_sharegpt_and_alpaca_records_train_the_conversations_they_are(tiny, tmp_path):
    """ShareGPT's {"conversations": [{"from", "value"}]} and Alpaca's {"instruction", "input", "output"} (in a
    .json array, as Alpaca's data is published, or JSONL) give the examples of the same messages."""
    tokenizer = tiny.tokenizer
    conversation = CONVERSATIONS[1]["messages"]
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in conversation]}
    alpaca = [
        # (tatsu-lab/alpaca's "text" column renders the record in Alpaca's template: the fields are read instead)
        {"instruction": "Add these.", "input": "2 and 3", "output": "5", "text": "### Instruction: Add these..."},
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
    ]
    as_messages = [
        {"messages": [{"role": "user", "content": "Add these.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [*[{"role": r, "content": c} for r, c in (("system", "Be brief."), ("user", "Say hi."))]]},
    ]
    as_messages[1]["messages"].append({"role": "assistant", "content": "Hi!"})
    expected = read_chat_jsonl(_write(tmp_path / "m.jsonl", [CONVERSATIONS[1], *as_messages]), tokenizer, eos_id=1)
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    got = read_chat_jsonl(_write(tmp_path / "s.jsonl", [sharegpt]), tokenizer, eos_id=1)
    got += read_chat_jsonl(tmp_path / "alpaca.json", tokenizer, eos_id=1)
    assert [(e.prompt, e.response) for e in got] == [(e.prompt, e.response) for e in expected]
    assert len(got) == 4  # two answers in the ShareGPT conversation, one a record in Alpaca's
    context_first = json.loads(json.dumps(sharegpt))
    context_first["conversations"][2]["weight"] = 0  # the first answer context only, as OpenAI's format marks it
    (last,) = read_chat_jsonl(_write(tmp_path / "w.jsonl", [context_first]), tokenizer, eos_id=1)
    assert (last.prompt, last.response) == (got[1].prompt, got[1].response)
    import pyarrow
    import pyarrow.parquet

    # a Hub dataset's Parquet file: a record a row (ShareGPT's column of turns, Alpaca's columns)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([sharegpt]), tmp_path / "sharegpt.parquet")
    columns = {key: [record.get(key) for record in alpaca] for key in ("instruction", "input", "output", "system")}
    pyarrow.parquet.write_table(pyarrow.Table.from_pydict(columns), tmp_path / "alpaca.parquet")  # (no system: null)
    from_parquet = [read_chat_jsonl(tmp_path / f"{name}.parquet", tokenizer, 1) for name in ("sharegpt", "alpaca")]
    assert [(e.prompt, e.response) for e in from_parquet[0] + from_parquet[1]] == [(e.prompt, e.response) for e in got]
    # a column of messages gives every message every key any has, null where it had none (weight, tool_calls)
    weighted = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 1}]}
    rows = [weighted, as_messages[0]]  # the second row's answer gets `"weight": null`
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "weighted.parquet")
    both = read_chat_jsonl(tmp_path / "weighted.parquet", tokenizer, 1)
    assert [(e.prompt, e.response) for e in both][1] == (got[2].prompt, got[2].response)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DiffGemmaError, match="fake.parquet: not a readable Parquet file"):
        read_chat_jsonl(tmp_path / "fake.parquet", tokenizer, eos_id=1)
    bad = [
        ({"conversations": [{"from": "narrator", "value": "x"}]}, r"conversations\[0\]: expected"),
        ({"conversations": []}, '"conversations" must be a non-empty list'),
        ({"instruction": "x", "output": ""}, "Alpaca.s .*not empty"),
    ]
    for record, message in bad:
        with pytest.raises(DiffGemmaError, match=rf"s.jsonl:1: {message}"):
            read_chat_jsonl(_write(tmp_path / "s.jsonl", [record]), tokenizer, eos_id=1)
    (tmp_path / "object.json").write_text(json.dumps(alpaca[0]))
    with pytest.raises(DiffGemmaError, match="object.json: a .json data file holds one array"):
        read_chat_jsonl(tmp_path / "object.json", tokenizer, eos_id=1)
    (tmp_path / "broken.json").write_text(json.dumps(alpaca)[:-1])
    with pytest.raises(DiffGemmaError, match="broken.json: not valid JSON"):
        read_chat_jsonl(tmp_path / "broken.json", tokenizer, eos_id=1)
    (tmp_path / "wrong.json").write_text(json.dumps([alpaca[0], {"instruction": 3, "output": "x"}]))
    with pytest.raises(DiffGemmaError, match=r"wrong.json\[1\]: Alpaca's"):
        read_chat_jsonl(tmp_path / "wrong.json", tokenizer, eos_id=1)


def test_data_can_be_a_dataset_folder_or_a_hub_dataset(tiny, tmp_path, monkeypatch):
    """--data names a file, a dataset's folder (its Parquet files, else JSONL, else JSON; the training split's
    where the names tell splits apart) or a Hub dataset id, fetched; offline, a line that says so."""
    import huggingface_hub

    tokenizer = tiny.tokenizer
    dataset = tmp_path / "dataset"
    (dataset / "data").mkdir(parents=True)
    _write(dataset / "data" / "train-00000.jsonl", CONVERSATIONS[:1])
    _write(dataset / "data" / "train-00001.jsonl", CONVERSATIONS[1:])
    _write(dataset / "data" / "test-00000.jsonl", [{"text": "held out"}])
    (dataset / "README.md").write_text("a dataset card")
    whole = read_chat_jsonl(_write(tmp_path / "all.jsonl", CONVERSATIONS), tokenizer, eos_id=1)
    pairs = [(e.prompt, e.response) for e in whole]
    assert [(e.prompt, e.response) for e in read_chat_jsonl(dataset, tokenizer, 1)] == pairs
    held_out = read_chat_jsonl(dataset, tokenizer, 1, split="held_out")  # what `train chat` holds out unasked
    assert [tokenizer.decode(e.response) for e in held_out] == ["held out"]
    assert read_chat_jsonl(tmp_path / "all.jsonl", tokenizer, 1, split="held_out") == []  # a file: no split
    # what --eval-data names: a dataset's held-out split where it has one (not its training files), else all of it
    assert [tokenizer.decode(e.response) for e in read_chat_jsonl(dataset, tokenizer, 1, split="eval")] == ["held out"]
    as_eval = read_chat_jsonl(tmp_path / "all.jsonl", tokenizer, 1, split="eval")
    assert [(e.prompt, e.response) for e in as_eval] == pairs
    (dataset / "data" / "train-00000.jsonl").rename(dataset / "data" / "developer_chats-00000.jsonl")  # no split
    assert [(e.prompt, e.response) for e in read_chat_jsonl(dataset, tokenizer, 1)] == pairs  # the test file out
    (dataset / "data" / "developer_chats-00000.jsonl").rename(dataset / "data" / "train-00000.jsonl")
    asked = []

    def fake_download(repo_id, allow_patterns, repo_type="model"):
        asked.append((repo_id, repo_type, allow_patterns))
        return str(dataset)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert [(e.prompt, e.response) for e in read_chat_jsonl("someone/chats", tokenizer, 1)] == pairs
    assert asked == [("someone/chats", "dataset", ["*.parquet", "*.jsonl", "*.json"])]
    with pytest.raises(DiffGemmaError, match="data/chat.jsonl: file not found"):
        read_chat_jsonl("data/chat.jsonl", tokenizer, 1)  # a path, not a Hub id
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffGemmaError, match="someone/chats: .*downloading the dataset from the Hugging Face Hub"):
        read_chat_jsonl("someone/chats", tokenizer, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffGemmaError, match="empty: no data files in it"):
        read_chat_jsonl(empty, tokenizer, 1)


def test_tool_calling_conversations_train_the_call_and_the_answer_after_it(tiny, tmp_path):
    """A record's "tools" (TRL's column) reach the template; the turn that calls ends after its call with
    <|tool_response> (where inference stops for the tool), and the answer after the tool's result is the next
    example, its prompt the conversation through that result: what the Python API and server send."""
    from assets.make_demo_model import WEATHER_ANSWER, WEATHER_CALL, WEATHER_TOOL, weather_conversation

    tokenizer = tiny.tokenizer
    conversation = [*weather_conversation(True), {"role": "assistant", "content": WEATHER_ANSWER}]
    record = {"tools": [WEATHER_TOOL], "messages": conversation}
    call, answer = read_chat_jsonl(_write(tmp_path / "tools.jsonl", [record]), tokenizer, eos_id=1)
    assert call.prompt == tokenizer.encode_chat(weather_conversation(False), tools=[WEATHER_TOOL])
    tool_response = tokenizer.token_id("<|tool_response>")
    assert call.response == [*tokenizer.encode(WEATHER_CALL, add_special_tokens=False), tool_response]
    assert answer.prompt == tokenizer.encode_chat(weather_conversation(True), tools=[WEATHER_TOOL])
    assert tokenizer.decode(answer.response, skip_special_tokens=False) == f"{WEATHER_ANSWER}<turn|>\n<eos>"


def test_openais_fine_tuning_format_trains_calling_turns_without_content(tiny, tmp_path):
    """OpenAI's fine-tuning data for function calling gives an assistant's calling turn `tool_calls` and no
    `content` (its API a null one): the same examples as an empty content (refused before, as a message with
    no content)."""
    from assets.make_demo_model import WEATHER_ANSWER, WEATHER_TOOL, weather_conversation

    conversation = [*weather_conversation(True), {"role": "assistant", "content": WEATHER_ANSWER}]
    records = [{"tools": [WEATHER_TOOL], "messages": conversation}]
    for content in ("absent", None):
        call_turn = {key: value for key, value in conversation[1].items() if key != "content"}
        if content is None:
            call_turn["content"] = None
        records.append({"tools": [WEATHER_TOOL], "messages": [conversation[0], call_turn, *conversation[2:]]})
    examples = read_chat_jsonl(_write(tmp_path / "calls.jsonl", records), tiny.tokenizer, eos_id=1)
    assert len(examples) == 6
    for other in (examples[2:4], examples[4:6]):
        assert [(e.prompt, e.response) for e in other] == [(e.prompt, e.response) for e in examples[:2]]


def test_a_turn_weighted_zero_is_context_not_an_example(tiny, tmp_path):
    """OpenAI's fine-tuning format: an assistant turn with "weight": 0 is not learned, but the turns after it
    see it (the same prompt as without the weight); in a prompt/completion record too."""
    conversation = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "weight": 1},
    ]
    plain = [{key: value for key, value in m.items() if key != "weight"} for m in conversation]
    records = [{"messages": conversation}, {"prompt": conversation[:3], "completion": conversation[3:]}]
    weighted = read_chat_jsonl(_write(tmp_path / "w.jsonl", records), tiny.tokenizer, eos_id=1)
    every = read_chat_jsonl(_write(tmp_path / "p.jsonl", [{"messages": plain}]), tiny.tokenizer, eos_id=1)
    assert len(every) == 2 and len(weighted) == 2
    for example in weighted:
        assert (example.prompt, example.response) == (every[1].prompt, every[1].response)
    bad = [{"messages": [conversation[0], {**conversation[1], "weight": 0.5}]}]
    with pytest.raises(DiffGemmaError, match="b.jsonl:1: messages\\[1\\].weight must be 0 or 1, got 0.5"):
        read_chat_jsonl(_write(tmp_path / "b.jsonl", bad), tiny.tokenizer, eos_id=1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "chat.jsonl:2: not valid JSON"),
        ('{"messages": [null]}', "chat.jsonl:2: messages\\[0\\] must be an object with a string `role`"),
        ('{"messages": [{"role": "user"}]}', "chat.jsonl:2: messages\\[0\\] must be an object"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": 3}]}',
            "chat.jsonl:2: messages\\[1\\].tool_calls must be a list",
        ),
        ('{"prompt": "hi"}', "chat.jsonl:2: expected one of .* got the keys \\['prompt'\\]"),
        ('{"messages": []}', 'chat.jsonl:2: "messages" must be a non-empty list'),
        ("[1, 2]", "chat.jsonl:2: expected an object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "chat.jsonl:2: no assistant turn"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "chat.jsonl:2: messages\\[0\\]: an assistant"),
    ],
)
def test_bad_lines_name_file_and_line(tiny, tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + line + "\n")
    with pytest.raises(DiffGemmaError, match=message):
        read_chat_jsonl(path, tiny.tokenizer, eos_id=1)


def test_eval_data_naming_a_dataset_reads_its_held_out_split(tmp_path, capsys):
    """`--eval-data` naming a dataset folder evaluates on its test split, not on its training files."""
    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    (tmp_path / "other").mkdir()
    _write(tmp_path / "other" / "train.jsonl", CONVERSATIONS * 3)
    _write(tmp_path / "other" / "test.jsonl", CONVERSATIONS[:1])
    argv = ["train", "chat", "--model", str(base), "--data", str(data), "--eval-data", str(tmp_path / "other")]
    assert main([*argv, "--out", str(tmp_path / "run"), "--lora-rank", "2", "--steps", "1"]) == 0
    assert "12 training examples, 1 held out" in capsys.readouterr().out  # 3 examples (assistant turns) a copy


def test_train_chat_lora_saves_adapter_and_resumes(tmp_path, capsys):
    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 12)
    out = tmp_path / "run"
    common = ["train", "chat", "--model", str(base), "--data", str(data), "--out", str(out), "--lora-rank", "4"]
    common += ["--batch-size", "4", "--eval-every", "3", "--lr", "5e-3"]
    assert main([*common, "--steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "35 training examples, 1 held out" in printed
    assert f"diffgemma serve --model {base} --lora-modules run={out}" in printed  # how to try it
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 6 and len(state["losses"]) == 6

    assert main([*common, "--steps", "9", "--resume"]) == 0
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 9 and len(state["losses"]) == 9
    merged = tmp_path / "merged"
    assert main(["lora-merge", "--model", str(base), "--adapter", str(out), "--out", str(merged)]) == 0
    assert diffgemma.load(merged).tokenizer is not None


def test_train_chat_full_resumes_from_the_runs_weights(tmp_path, capsys):
    """A full fine-tune resumed goes on from the weights it saved (read into the loaded base's tensors), not
    from the base: one step more moves them by about a step's worth (AdamW's steps are about the learning
    rate), where the four before moved them from the base by four."""
    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 12)
    common = ["train", "chat", "--model", str(base), "--data", str(data), "--batch-size", "4", "--eval-every", "0"]
    common += ["--out", str(tmp_path / "run"), "--lr", "1e-3"]
    assert main([*common, "--steps", "4"]) == 0
    trained = diffgemma.load(tmp_path / "run").network.embed_tokens.weight
    assert main([*common, "--steps", "5", "--resume"]) == 0
    capsys.readouterr()
    resumed = diffgemma.load(tmp_path / "run").network.embed_tokens.weight
    start = diffgemma.load(base).network.embed_tokens.weight
    assert 0 < (resumed - trained).norm() < (resumed - start).norm() / 2


def test_training_that_memory_cannot_hold_is_refused_before_its_first_step(tiny, tmp_path, monkeypatch):
    from diffgemma import resources
    from diffgemma.train.memory import update_bytes
    from diffgemma.train.trainer import TrainConfig, train

    network = diffgemma.load(tiny.folder).network
    need = sum(update_bytes(list(network.parameters())))
    monkeypatch.setattr(resources, "free_memory", lambda device: need - 1)
    steps = []
    with pytest.raises(DiffGemmaError, match="training's gradients and AdamW's state need .* MiB, and this machine"):
        train(network, steps.append, TrainConfig(steps=1), eos_id=1, pad_id=0, show_progress=False)
    assert steps == []


def test_a_model_taught_to_call_tools_stops_at_the_calls_end(tmp_path, capsys):
    """A preset's EOS list is [<eos>] alone; fine-tuned on calling turns (which end with <|tool_response>), the
    checkpoint it writes, and the adapter's merge, stop there too, or generation would write on past a call."""
    from assets.make_demo_model import WEATHER_ANSWER, WEATHER_TOOL, weather_conversation

    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    assert diffgemma.load(base).settings.eos_token_id == (1,)
    tool_response = diffgemma.load(base).tokenizer.token_id("<|tool_response>")
    conversation = [*weather_conversation(True), {"role": "assistant", "content": WEATHER_ANSWER}]
    data = _write(tmp_path / "tools.jsonl", [{"tools": [WEATHER_TOOL], "messages": conversation}] * 2)
    common = ["train", "chat", "--model", str(base), "--data", str(data), "--batch-size", "2", "--steps", "1"]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    assert "responses end with <|tool_response> too: added to the EOS ids" in capsys.readouterr().out
    assert diffgemma.load(tmp_path / "full").settings.eos_token_id == (1, tool_response)
    assert main([*common, "--out", str(tmp_path / "adapter"), "--lora-rank", "2"]) == 0
    assert "added to the EOS ids" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["lora-merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(merged)]) == 0
    assert diffgemma.load(merged).settings.eos_token_id == (1, tool_response)
    # plain chat data ends with an EOS already listed: nothing added
    plain = _write(tmp_path / "chat.jsonl", CONVERSATIONS)
    assert (
        main([*common[:4], "--data", str(plain), "--batch-size", "2", "--steps", "1", "--out", str(tmp_path / "p")])
        == 0
    )
    assert "added to the EOS ids" not in capsys.readouterr().out
    assert diffgemma.load(tmp_path / "p").settings.eos_token_id == (1,)


def test_train_chat_eval_every_zero_keeps_only_the_final_checkpoint(tmp_path, capsys):
    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 12)
    out = tmp_path / "run"
    common = ["train", "chat", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "4"]
    assert main([*common, "--steps", "3", "--eval-every", "0"]) == 0
    assert "held-out loss" not in capsys.readouterr().out
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 3
    assert main([*common, "--steps", "3", "--eval-every", "-1"]) == 2
    assert "must be 0" in capsys.readouterr().err


def test_train_chat_checkpoints_layers_unless_told_not_to(tmp_path, monkeypatch):
    """`train chat` turns gradient checkpointing on by default (--no-gradient-checkpointing: off); both runs
    take the same steps with the same losses."""
    from diffgemma.model import DiffusionGemma

    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    settings = []
    original = DiffusionGemma.checkpoint_layers
    monkeypatch.setattr(
        DiffusionGemma, "checkpoint_layers", lambda self, on=True: settings.append(on) or original(self, on)
    )
    losses = []
    for flag in ([], ["--no-gradient-checkpointing"]):
        out = tmp_path / f"run{len(losses)}"
        common = ["train", "chat", "--model", str(base), "--data", str(data), "--out", str(out), "--batch-size", "4"]
        assert main([*common, "--steps", "3", "--eval-every", "0", "--lr", "1e-3", *flag]) == 0
        losses.append(torch.load(out / "trainer_state.pt", weights_only=False)["losses"])
    assert settings == [True, False]
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5), losses


def test_train_chat_leaves_out_examples_over_max_length(tmp_path, capsys):
    """--max-length leaves out the examples whose prompt and response canvases take more tokens, and says so; the
    log gives the longest example's length either way; a limit no example meets is an error."""
    from diffgemma.train.sft import example_length

    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    long_talk = {
        "messages": [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "x" * 300}]
    }
    data = _write(tmp_path / "chat.jsonl", [*CONVERSATIONS * 4, long_talk])
    model = diffgemma.load(base)
    examples = read_chat_jsonl(data, model.tokenizer, eos_id=model.settings.eos_token_id[0])
    lengths = [example_length(example, model.config.canvas_length) for example in examples]
    short = max(lengths[:-1])
    assert lengths[-1] > short
    common = ["train", "chat", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "run")]
    common += ["--batch-size", "4", "--steps", "1", "--eval-every", "0"]
    assert main(common) == 0
    assert f"{len(examples)} training examples, 0 held out; the longest takes {max(lengths):,} tokens" in (
        capsys.readouterr().out
    )
    assert main([*common, "--max-length", str(short)]) == 0
    out = capsys.readouterr().out
    assert f"1 of {len(examples)} training examples are longer than --max-length {short} tokens" in out
    assert f"{len(examples) - 1} training examples, 0 held out; the longest takes {short:,} tokens" in out
    assert main([*common, "--max-length", str(min(lengths) - 1)]) == 2
    assert "no training example fits in --max-length" in capsys.readouterr().err


def test_train_chat_needs_data(tmp_path, capsys):
    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    assert main(["train", "chat", "--model", str(base), "--out", str(tmp_path / "o")]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_qlora_trains_adapters_over_a_frozen_quantized_base(tmp_path, capsys):
    """LoRA over an int4 base (QLoRA): the adapters learn, the stored base stays as it was, the adapted model
    still generates, and the adapter merges into the float checkpoint (onto the quantized one it is refused,
    before anything changes)."""
    from diffgemma.train.lora import LoraQuantLinear, LoraSettings, merge_lora
    from diffgemma.train.sft import FinetuneOptions, finetune

    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 12)
    out = tmp_path / "run"
    model = diffgemma.load(base, quant="int4")
    stored = {k: v.clone() for k, v in model.network.state_dict().items() if k.endswith(("_qweight", "_scale"))}
    options = FinetuneOptions(str(data), str(out), lora=LoraSettings(4), steps=8, batch_size=4, peak_lr=5e-3)
    losses = finetune(model, options, log=lambda _: None, show_progress=False)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert sum(isinstance(m, LoraQuantLinear) for m in model.network.modules()) > 0
    state = model.network.state_dict()
    assert stored and all(torch.equal(state[k], v) for k, v in stored.items())
    assert model.generate("Hi", max_new_tokens=8, seed=0).text is not None
    with pytest.raises(DiffGemmaError, match="merge the adapter into the float checkpoint"):
        merge_lora(model.network)
    assert sum(isinstance(m, LoraQuantLinear) for m in model.network.modules()) > 0  # nothing merged
    merged = tmp_path / "merged"
    assert main(["lora-merge", "--model", str(base), "--adapter", str(out), "--out", str(merged)]) == 0
    assert diffgemma.load(merged).generate("Hi", max_new_tokens=8, seed=0).text is not None
    capsys.readouterr()
    common = [
        "train",
        "chat",
        "--model",
        str(base),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--quant",
        "int4",
    ]
    assert main(common) == 2 and "give --lora-rank too" in capsys.readouterr().err
    assert main(["train", "sudoku", "--out", str(tmp_path / "s"), "--quant", "int4"]) == 2
    assert "--quant is for `train chat`" in capsys.readouterr().err


def test_train_chat_under_torchrun_trains_the_ranks_together(tmp_path, capsys, monkeypatch):
    """`torchrun ... diffgemma train chat`: the ranks join one process group (gloo on the CPU) and share their
    gradients, rank 0 alone writes and logs, and two ranks of one micro-batch each end where one process with
    two accumulated micro-batches does (the same batches, the same averaged gradients)."""
    import subprocess
    import sys

    from server_util import free_port

    base = random_checkpoint(tmp_path / "base", preset="tiny", seed=7)
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS * 3)
    common = ["train", "chat", "--model", str(base), "--data", str(data), "--steps", "3", "--batch-size", "2"]
    common += ["--lr", "5e-3", "--eval-every", "0", "--device", "cpu", "--threads", "1"]
    ranks = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", "diffgemma.cli", *common, "--out", str(ranks)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training examples") == 1  # rank 0 logs
    assert main([*common, "--out", str(tmp_path / "alone"), "--accumulation", "2"]) == 0
    together = diffgemma.load(ranks).network.state_dict()
    alone = diffgemma.load(tmp_path / "alone").network.state_dict()
    start = diffgemma.load(base).network.state_dict()
    assert any(not torch.equal(together[name], start[name]) for name in start)  # it trained
    for name, weight in alone.items():
        assert torch.allclose(together[name], weight, atol=1e-5), name
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "sudoku", "--out", str(tmp_path / "sudoku"), "--steps", "1"]) == 2
    assert "torchrun is for train chat" in capsys.readouterr().err
