"""Small, deterministic, offline toy models: the ``lmkl demo`` default (tests build tinier ones).

Everything here is built from text that every CPython ships (``pydoc_data.topics``, ~79 help
topics, ~465 KB of English), so the demo and the tests need no network and no downloads:

* a byte-level BPE tokenizer trained with ``tokenizers`` (so it never needs an unknown token,
  gives exact offsets and round-trips any text);
* randomly initialised causal LMs from ``transformers`` configs (Llama, GPT-2, Qwen2), trained
  for a short while with AdamW so that their next-token distributions are not trivial;
* :func:`build_demo_assets`, which builds a *reference* (bigger, trained longer) and a
  *candidate* ("student": smaller, trained less) and caches them, so ``lmkl demo`` has a pair
  whose KL divergence is clearly non-zero yet far from chance;

Builds are deterministic for a given torch / transformers / tokenizers version and thread count
(float summation order on CPU depends on the number of threads, so bit-identical weights are only
promised on the same setup; the tokenizer does not depend on it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lmkl.files import give_normal_modes, make_temp_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# transformers and tokenizers are imported inside the functions that need them: ``import lmkl``
# must stay cheap, and the caller may still want to set HF_HUB_OFFLINE before they are imported.

Arch = Literal["llama", "gpt2", "qwen2"]
ProgressFn = Callable[[str], None]

#: Bump whenever anything that changes the built demo files changes (corpus split, tokenizer
#: recipe, model recipe, training loop, file layout): old caches are then rebuilt, never reused.
DEMO_VERSION = 1

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
#: Ids 0-3 in every tokenizer built here (the BPE trainer assigns special tokens first).
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)

MANIFEST = "manifest.json"
HELDOUT = "heldout.jsonl"
REFERENCE = "reference"
CANDIDATE = "candidate"
# A stale temporary build (from a killed process) older than this is removed by the next build;
# younger ones may belong to a concurrent build and are left alone.
_STALE_TMP_SECONDS = 3600.0


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def _topic_texts() -> list[str]:
    """The pydoc topics' texts, sorted by topic name, stripped, empties dropped."""
    from pydoc_data.topics import topics

    texts = (str(topics[key]).strip() for key in sorted(topics))
    return [text for text in texts if text]


def demo_corpus(heldout_every: int = 8) -> tuple[list[str], list[str]]:
    """Split the pydoc topics into training and held-out documents, deterministically.

    Topics are sorted by name and every ``heldout_every``-th one (the 1st, 9th, 17th, ...) is held
    out: ~10 documents, ~37 KB with the default. Whole topics are held out (not a slice of each)
    so the held-out text is genuinely unseen by the models.
    """
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be at least 2, got {heldout_every}")
    texts = _topic_texts()
    train = [t for i, t in enumerate(texts) if i % heldout_every != 0]
    heldout = [t for i, t in enumerate(texts) if i % heldout_every == 0]
    return train, heldout


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; return a ``PreTrainedTokenizerFast``.

    * Special tokens ``<s>`` (BOS, id 0), ``</s>`` (EOS, 1), ``<pad>`` (2), ``<unk>`` (3).
    * Encoding with ``add_special_tokens=True`` (the default) prepends exactly one BOS, like
      Llama tokenizers; nothing is appended.
    * Byte-level: every byte is in the base alphabet, so any text encodes without ``<unk>`` and
      decodes back to itself; no normalizer and no prefix space, so the round trip is exact.
    * Offsets are untrimmed, so the tokens' character spans tile the text (the space before a
      word belongs to the word's token); the byte tokens of one multi-byte character that BPE did
      not merge each report that character's span; special tokens get ``(0, 0)``.

    The result is deterministic for the same texts and vocab size, and survives
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` unchanged (BOS included).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (byte level)")
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.Sequence(
        [
            # Keep the byte-level offsets untrimmed (spans then cover the whole text).
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        # The default cleanup rewrites " ." to "." etc. on decode, which breaks round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


def encode_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate ``<s> doc </s>`` for every document into one 1-D ``int64`` token stream.

    BOS starts every document because that is how the models are later evaluated (documents are
    encoded with the tokenizer's normal special tokens); EOS marks where a document ends.
    """
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _mlp_width(hidden_size: int) -> int:
    """SwiGLU width ≈ 8/3 · hidden (what Llama/Qwen use), rounded up to a multiple of 32."""
    return -(-(8 * hidden_size // 3) // 32) * 32


def build_model(
    arch: Arch,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    max_positions: int = 512,
    seed: int = 0,
    padded_vocab: int | None = None,
    tie_word_embeddings: bool | None = None,
    num_kv_heads: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM (``PreTrainedModel``) built from a config.

    ``vocab_size`` is the tokenizer's size; ``padded_vocab`` (≥ ``vocab_size``) makes the
    embedding and output layer wider than the tokenizer, as many released models do (the extra
    rows are never targets, so training pushes their logits down but they are not tokens).
    Special ids follow :data:`SPECIAL_TOKENS` (BOS 0, EOS 1, PAD 2).

    ``tie_word_embeddings`` defaults to each family's usual choice for small models: GPT-2 and
    Qwen2 tie the output layer to the input embedding, Llama does not (so both layouts get
    exercised). ``num_kv_heads`` (Llama/Qwen2 only) enables grouped-query attention.

    Initialisation uses ``seed`` without disturbing the caller's global RNG state.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    width = vocab_size if padded_vocab is None else padded_vocab
    if width < vocab_size:
        raise ValueError(f"padded_vocab ({padded_vocab}) is smaller than vocab_size ({vocab_size})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    config: Any
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=width,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            # No dropout: training stays deterministic and eval/train modes agree.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
            **ids,
        )
    elif arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(
            vocab_size=width,
            hidden_size=hidden_size,
            intermediate_size=_mlp_width(hidden_size),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-6,
            tie_word_embeddings=(arch == "qwen2")
            if tie_word_embeddings is None
            else tie_word_embeddings,
            **ids,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama', 'gpt2' or 'qwen2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Saved into config.json, so loaders that honour it keep float32.
    model.config.dtype = torch.float32
    model.eval()
    return model


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: leave it alone)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` × the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_model(
    model: PreTrainedModel,
    token_stream: torch.Tensor,
    steps: int,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    num_threads: int | None = None,
) -> list[float]:
    """Train ``model`` in place on random windows of ``token_stream``; return the step losses.

    Each step draws ``batch_size`` windows of ``seq_len + 1`` tokens at positions from a
    ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched), and minimises the
    next-token cross-entropy with AdamW (betas 0.9/0.95, gradient clipping at 1.0), linear
    warm-up (default 10 % of the steps) and cosine decay to 10 % of ``lr``. The model is left in
    eval mode. ``on_step(step, loss)`` is called after every step (for progress reports).
    ``num_threads`` sets torch's intra-op threads for the duration of training only (``None``:
    leave them as they are).
    """
    stream = token_stream.reshape(-1).long()
    if stream.numel() < seq_len + 2:
        raise ValueError(f"token stream of {stream.numel()} tokens is too short for {seq_len=}")
    if steps <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    # Decay matrices only; norms and biases are left alone, as usual.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
    offsets = torch.arange(seq_len + 1)
    losses: list[float] = []
    model.train()
    try:
        with _torch_threads(num_threads):
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(step, steps, warmup)
                starts = torch.randint(
                    0, stream.numel() - seq_len, (batch_size,), generator=generator
                )
                batch = stream[starts[:, None] + offsets]
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(step, losses[-1])
    finally:
        model.eval()
    return losses


def save_model(model: PreTrainedModel, tokenizer: Any, out_dir: Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` together into ``out_dir``; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 records the class as "TokenizersBackend", a name transformers 4 lacks; the
    # portable name loads the same tokenizer.json in both (and our pyproject allows both).
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Demo assets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRecipe:
    """How to build and train one toy model."""

    arch: Arch
    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    lr: float = 3e-3
    seed: int = 0
    padded_vocab: int | None = None
    tie_word_embeddings: bool | None = None


@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the demo build; part of the cache key and the manifest.

    The defaults are tuned so that on 2 CPU cores the whole build takes about 2.5 min (155 s
    measured) and the pair differs clearly but not absurdly (see :func:`build_demo_assets`). The
    reference is deliberately narrow (128): with ~118k training tokens and this step budget a
    192-wide one reached a clearly worse held-out loss, and cost 1.7x as much per step.
    """

    vocab_size: int = 2048
    heldout_every: int = 8
    seq_len: int = 256
    batch_size: int = 8
    max_positions: int = 1024
    #: Torch threads while training (``None``: as configured). Part of the key because float
    #: summation order, hence the exact weights, depends on it.
    num_threads: int | None = None
    reference: ModelRecipe = field(
        default_factory=lambda: ModelRecipe(
            arch="llama", hidden_size=128, num_layers=4, num_heads=4, steps=500, seed=1
        )
    )
    candidate: ModelRecipe = field(
        default_factory=lambda: ModelRecipe(
            arch="qwen2", hidden_size=128, num_layers=2, num_heads=4, steps=300, seed=2
        )
    )

    def key(self) -> str:
        """A short stable hash of the settings and :data:`DEMO_VERSION` (names the cache dir)."""
        blob = json.dumps({"v": DEMO_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class DemoAssets:
    """A built demo: two model dirs (each with the shared tokenizer) and the held-out text."""

    root: Path
    reference_dir: Path
    candidate_dir: Path
    heldout_path: Path
    manifest: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        """Where the shared tokenizer lives (it is saved in both model dirs)."""
        return self.reference_dir


def _assets_at(root: Path) -> DemoAssets | None:
    """The assets in ``root`` if its build is complete, else ``None`` (no validation of keys)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    required = [root / HELDOUT]
    for name in (REFERENCE, CANDIDATE):
        required += [root / name / f for f in ("config.json", "model.safetensors")]
        required += [root / name / "tokenizer.json", root / name / "tokenizer_config.json"]
    if not isinstance(manifest, dict) or not all(p.is_file() for p in required):
        return None
    return DemoAssets(root, root / REFERENCE, root / CANDIDATE, root / HELDOUT, manifest)


def _load_cached(root: Path, settings: DemoSettings) -> DemoAssets | None:
    """Cached assets in ``root`` if they are complete and were built by this exact recipe."""
    assets = _assets_at(root)
    if assets is None:
        return None
    manifest = assets.manifest
    settings_dict = json.loads(json.dumps(asdict(settings)))  # tuples → lists, as on disk
    if manifest.get("demo_version") != DEMO_VERSION or manifest.get("settings") != settings_dict:
        return None
    return assets


def _remove_stale_tmp(cache_dir: Path) -> None:
    """Delete leftovers of killed builds (temp dirs older than an hour); ignore failures."""
    now = time.time()
    for path in cache_dir.glob(".demo-*.tmp*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)


def write_jsonl(path: Path, texts: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _train_recipe(
    name: str,
    recipe: ModelRecipe,
    tokenizer: Any,
    stream: torch.Tensor,
    settings: DemoSettings,
    out_dir: Path,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Build, train and save one demo model; return its manifest entry."""
    model = build_model(
        recipe.arch,
        len(tokenizer),
        recipe.hidden_size,
        recipe.num_layers,
        recipe.num_heads,
        max_positions=settings.max_positions,
        seed=recipe.seed,
        padded_vocab=recipe.padded_vocab,
        tie_word_embeddings=recipe.tie_word_embeddings,
    )
    n_params = count_parameters(model)
    start = time.perf_counter()
    report_every = max(1, recipe.steps // 8)

    def on_step(step: int, loss: float) -> None:
        if progress is not None and ((step + 1) % report_every == 0 or step + 1 == recipe.steps):
            progress(f"training {name}: step {step + 1}/{recipe.steps}, loss {loss:.3f}")

    if progress is not None:
        progress(
            f"training {name} ({recipe.arch}, {recipe.num_layers} layers × {recipe.hidden_size}, "
            f"{n_params / 1e6:.2f}M parameters, {recipe.steps} steps)"
        )
    losses = train_model(
        model,
        stream,
        recipe.steps,
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        on_step=on_step,
        num_threads=settings.num_threads,
    )
    seconds = time.perf_counter() - start
    save_model(model, tokenizer, out_dir)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "arch": recipe.arch,
        "parameters": n_params,
        "train_seconds": round(seconds, 2),
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
    }


def build_demo_assets(
    cache_dir: Path,
    force: bool = False,
    progress: ProgressFn | None = None,
    settings: DemoSettings | None = None,
) -> DemoAssets:
    """The ``lmkl demo`` pair, built once (about 2.5 min on 2 CPU cores) and then cached.

    Assets live in ``cache_dir / f"demo-v{DEMO_VERSION}-{settings.key()}"``:
    ``reference/`` (Llama, 4 layers × 128, trained 500 steps), ``candidate/`` (Qwen2,
    2 layers × 128, 300 steps; a smaller "student" of the same data), both with the shared
    tokenizer, ``heldout.jsonl`` (one ``{"text": ...}`` per held-out pydoc topic) and
    ``manifest.json``. On the held-out text (~11k tokens, 512-token windows) the pair's mean
    KL(reference ‖ candidate) is about 1 nat per token and the two agree on the top-1 token about
    45 % of the time (chance: 0.05 %); held-out cross-entropy is about 4.3 nats for the reference
    and 4.6 for the candidate. Exact figures vary with torch version and thread count.

    A complete cache built by the same :data:`DEMO_VERSION` and ``settings`` is returned at once
    (``force`` rebuilds it). A build is written to a temp dir in ``cache_dir`` and renamed into
    place, with the manifest written last, so an interrupted build never leaves a cache that
    looks complete. ``progress`` receives one-line status messages.
    """
    settings = settings or DemoSettings()
    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / f"demo-v{DEMO_VERSION}-{settings.key()}"
    if not force:
        cached = _load_cached(root, settings)
        if cached is not None:
            return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(cache_dir)

    started, started_cpu = time.perf_counter(), time.process_time()
    tmp = make_temp_dir(cache_dir, prefix=f".{root.name}.tmp")
    try:
        if progress is not None:
            progress("preparing the demo corpus and training the tokenizer")
        train_texts, heldout_texts = demo_corpus(settings.heldout_every)
        tokenizer = train_tokenizer(train_texts, settings.vocab_size)
        stream = encode_stream(tokenizer, train_texts)
        write_jsonl(tmp / HELDOUT, heldout_texts)
        entries = {
            name: _train_recipe(name, recipe, tokenizer, stream, settings, tmp / name, progress)
            for name, recipe in ((REFERENCE, settings.reference), (CANDIDATE, settings.candidate))
        }
        import tokenizers
        import transformers

        manifest = {
            "demo_version": DEMO_VERSION,
            "settings": json.loads(json.dumps(asdict(settings))),
            "corpus": {
                "source": "pydoc_data.topics",
                "train_documents": len(train_texts),
                "heldout_documents": len(heldout_texts),
                "train_tokens": int(stream.numel()),
            },
            "models": entries,
            "build_seconds": round(time.perf_counter() - started, 2),
            # CPU time tells a slow build on a busy machine from a slow recipe.
            "build_cpu_seconds": round(time.process_time() - started_cpu, 2),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "torch_threads": settings.num_threads or torch.get_num_threads(),
            },
        }
        # Written last: its presence is what marks a build as complete.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        give_normal_modes(tmp)  # safetensors writes 0o600: a shared cache must be readable
        _install(tmp, root, settings, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    assets = _assets_at(root)
    if assets is None:  # pragma: no cover - only if someone deletes files under our feet
        raise RuntimeError(f"demo build in {root} vanished after it was written")
    if progress is not None:
        progress(f"demo models ready in {root} ({time.perf_counter() - started:.0f} s)")
    return assets


def _install(tmp: Path, root: Path, settings: DemoSettings, force: bool) -> None:
    """Move a finished build from ``tmp`` to ``root``, replacing an old or incomplete one.

    If a concurrent process installed a valid build meanwhile (and ``force`` is off), that one
    is kept and ours discarded: both are identical by construction.
    """
    if root.exists():
        if not force and _load_cached(root, settings) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = root.with_name(f".{root.name}.tmp-old-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):  # another builder may have moved it
            os.replace(root, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        # Lost a race with another builder: keep theirs if it is complete.
        if _load_cached(root, settings) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def iter_heldout(path: Path) -> Iterator[str]:
    """The texts of a ``heldout.jsonl`` written by this module, in order."""
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)["text"]
