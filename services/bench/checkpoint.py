"""The checkpoint a benchmark runs: a local folder or hub name as given, else a random GPT-2 built here."""

from __future__ import annotations

from pathlib import Path

# GPT-2 124M's shape (transformers' GPT2Config defaults), and a tiny body on GPT-2's vocabulary for --quick:
# the tokenizer, the router's detokenizer and the prompts' token ids all need the real vocabulary.
FULL_SHAPE: dict[str, int] = {}
TINY_SHAPE = dict(n_layer=4, n_head=4, n_embd=64, vocab_size=50257, n_positions=1024)


def random_gpt2(folder: Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """config.json + model.safetensors of a random-weight GPT-2 (124M-shaped, or tiny) in `folder`; kept
    when it is already there, so runs into the same folder reuse it."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**(TINY_SHAPE if tiny else FULL_SHAPE)))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def resolve(model: str | None, workdir: Path, *, tiny: bool) -> tuple[str, str]:
    """(what the services and transformers load, a label for the report)."""
    if model is None:
        name = "gpt2-tiny-random" if tiny else "gpt2-124m-random"
        return str(random_gpt2(workdir / name, tiny=tiny)), f"{name} (random weights, transformers GPT2Config)"
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path)
    return model, model  # a hub name: the sharder and transformers download it
