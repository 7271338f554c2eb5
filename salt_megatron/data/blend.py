"""Where the training and validation data come from, in Megatron-LM's terms: one prefix or a weighted blend.

    --data-path P                   prepare's P_train / P_valid when they exist, else P itself (training only)
    --data-path P1 P2 P3            a blend, each prefix weighted by its size (megatron-core's rule without weights)
    --data-path 0.3 P1 0.7 P2       a blend with weights (normalised to sum to 1)
    --split 969,30,1                the --data-path datasets themselves, cut by document into train/valid/test
    --train-data-path ... / --valid-data-path ...   a blend per split (as --data-path; used as given)
    --data-args-path FILE           FILE holds what --data-path would (a long blend); --per-split-data-args-path
                                    JSON {"train": [...], "valid": [...]} the same for the per-split blends

Every form is checked here, with one line for what is wrong (a weight that is not a number, an odd weight/prefix
list, a missing prefix), before anything is built; megatron-core's own blend parser and ``BlendedDataset`` then
build it (``salt_megatron.data.gpt_data``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from salt_megatron.errors import DataError, MissingFile, UsageError


@dataclasses.dataclass(frozen=True)
class Blend:
    """Indexed-dataset prefixes mixed by weight (``weights`` None: by size, as megatron-core does)."""

    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    def megatron(self) -> tuple[list[str], list[float] | None]:
        """megatron-core's ``(prefixes, weights)`` blend."""
        return list(self.prefixes), None if self.weights is None else list(self.weights)

    def record(self):
        """What a checkpoint records: the absolute prefix for one dataset, else ``[[weight, prefix], ...]``."""
        if len(self.prefixes) == 1 and self.weights is None:
            return os.path.abspath(self.prefixes[0])
        weights = self.weights or (None,) * len(self.prefixes)
        return [[w, os.path.abspath(p)] for w, p in zip(weights, self.prefixes)]

    def __str__(self) -> str:
        if self.weights is None:
            return " ".join(self.prefixes)
        return " ".join(f"{w:g} {p}" for w, p in zip(self.weights, self.prefixes))


@dataclasses.dataclass(frozen=True)
class DataSources:
    """The run's data: the training blend, the validation blend (or None) and Megatron's ``--split``, which cuts
    each dataset of ``train`` (then ``valid`` is the same blend) into train/valid/test document ranges."""

    train: Blend
    valid: Blend | None
    split: str | None = None

    @property
    def prefixes(self) -> list[str]:
        seen = []
        for blend in (self.train, self.valid):
            for p in blend.prefixes if blend else ():
                if p not in seen:
                    seen.append(p)
        return seen


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _strip_suffix(prefix: str) -> str:
    """Accept ``P.bin`` / ``P.idx`` where a prefix ``P`` is meant."""
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def parse_blend(words, flag: str) -> Blend:
    """``P`` / ``P1 P2 ...`` / ``W1 P1 W2 P2 ...`` (Megatron-LM's forms) as a :class:`Blend`, or one line on what is
    malformed.  (megatron-core's ``get_blend_from_list`` does the parsing; it reads a half-weighted list as
    prefixes named "0.3", hence the checks first.)"""
    from megatron.core.datasets.utils import get_blend_from_list

    if isinstance(words, str):  # a --config YAML value
        words = words.split()
    words = [w for w in (words or []) if w.strip()]
    if not words:
        raise UsageError(f"{flag} is empty: give a prefix, or weights and prefixes")
    numbers = [_is_number(w) for w in words]
    if any(numbers):
        if len(words) % 2 or numbers[1::2].count(True) or numbers[::2].count(False):
            raise UsageError(f"{flag}: a weighted blend is WEIGHT PREFIX pairs (e.g. 0.3 A 0.7 B), got "
                             f"{' '.join(words)!r}")
        weights = [float(w) for w in words[::2]]
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise UsageError(f"{flag}: weights must be finite, >= 0 and not all 0, got {weights}")
    prefixes, weights = get_blend_from_list(words)
    prefixes = [_strip_suffix(p) for p in prefixes]
    if len(set(prefixes)) != len(prefixes):
        raise UsageError(f"{flag} names a prefix twice: {' '.join(prefixes)}")
    if weights is not None:
        total = sum(weights)
        weights = tuple(w / total for w in weights)
    return Blend(tuple(prefixes), weights)


def _exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def require_blend(blend: Blend, flag: str) -> Blend:
    """The blend, when every prefix is an indexed dataset as given (no _train/_valid lookup)."""
    for p in blend.prefixes:
        if not _exists(p):
            missing = [f for f in (p + ".bin", p + ".idx") if not os.path.isfile(f)]
            hint = f" (prepare wrote {p}_train / {p}_valid: drop --split)" if _exists(p + "_train") else ""
            raise MissingFile(f"{flag}: no indexed dataset {p!r} (missing {', '.join(missing)}){hint}")
    return blend


def _prepared(blend: Blend, flag: str) -> tuple[Blend, Blend | None]:
    """prepare's convention, prefix by prefix: ``P`` is ``P_train`` (+ ``P_valid``) when those exist, else ``P``."""
    train, valid = [], []
    for p in blend.prefixes:
        if _exists(p + "_train"):
            train.append(p + "_train")
            valid.append(p + "_valid" if _exists(p + "_valid") else None)
        elif _exists(p):
            train.append(p)
            valid.append(None)
        else:
            raise MissingFile(f"{flag}: no indexed dataset at {p!r}: looked for {p}_train.bin/.idx (prepare's "
                              f"output) and {p}.bin/.idx")
    if any(valid) and not all(valid):
        lacking = [t for t, v in zip(train, valid) if v is None]
        raise DataError(f"{flag}: some prefixes of the blend have a validation split and {', '.join(lacking)} "
                        "do(es) not: give --valid-data-path, or prepare them all with --valid-fraction")
    return (Blend(tuple(train), blend.weights),
            Blend(tuple(valid), blend.weights) if all(valid) else None)


def _read_args_file(path: str, flag: str):
    if not os.path.isfile(path):
        raise MissingFile(f"{flag}: no such file {path}")
    with open(path) as f:
        text = f.read()
    if flag == "--per-split-data-args-path":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag}: {path} is not JSON ({e})") from None
        if not isinstance(spec, dict) or not set(spec) <= {"train", "valid", "test"} or "train" not in spec:
            raise UsageError(f"{flag}: {path} must be a JSON object with a 'train' list (and 'valid'/'test')")
        return spec
    return text.split()


def data_sources(args) -> DataSources:
    """The data the flags name, checked: prefixes exist, weights parse.  One line on anything wrong."""
    data_path = getattr(args, "data_path", None)
    train_path, valid_path = getattr(args, "train_data_path", None), getattr(args, "valid_data_path", None)
    split = getattr(args, "split", None)
    if getattr(args, "data_args_path", None):
        if data_path:
            raise UsageError("give --data-path or --data-args-path, not both")
        data_path = _read_args_file(args.data_args_path, "--data-args-path")
    if getattr(args, "per_split_data_args_path", None):
        if train_path or valid_path:
            raise UsageError("give --train/--valid-data-path or --per-split-data-args-path, not both")
        spec = _read_args_file(args.per_split_data_args_path, "--per-split-data-args-path")
        train_path, valid_path = spec["train"], spec.get("valid")
    if split is not None:
        if train_path or valid_path:
            raise UsageError("--split cuts --data-path into train/valid/test; it cannot go with --train-data-path "
                             "or --valid-data-path (each already names its split)")
        if not data_path:
            raise UsageError("--split needs --data-path")
        check_split(split)
        blend = require_blend(parse_blend(data_path, "--data-path"), "--data-path")
        return DataSources(train=blend, valid=blend, split=split)
    if not (data_path or train_path):
        raise UsageError("no training data: give --data-path (or --train-data-path)")
    train = valid = None
    if data_path:
        train, valid = _prepared(parse_blend(data_path, "--data-path"), "--data-path")
    if train_path:
        train = require_blend(parse_blend(train_path, "--train-data-path"), "--train-data-path")
    if valid_path:
        valid = require_blend(parse_blend(valid_path, "--valid-data-path"), "--valid-data-path")
    return DataSources(train=train, valid=valid)


def check_split(split: str) -> list[float]:
    """Megatron's ``--split`` ("969,30,1", "98,2", "1"): up to three non-negative numbers, the first > 0."""
    parts = [s.strip() for s in split.replace("/", ",").split(",")]
    if not 1 <= len(parts) <= 3 or not all(_is_number(s) for s in parts):
        raise UsageError(f"--split wants up to three comma-separated weights for train,valid,test, got {split!r}")
    weights = [float(s) for s in parts]
    if any(not math.isfinite(w) or w < 0 for w in weights) or weights[0] <= 0:
        raise UsageError(f"--split: the weights must be >= 0 and the train weight > 0, got {split!r}")
    return weights


def parse_extra_valid(specs) -> dict[str, str]:
    """``["NAME=PREFIX", ...]`` → ``{NAME: PREFIX}`` (ValueError on a malformed or repeated name)."""
    out = {}
    for spec in specs or []:
        name, sep, prefix = spec.partition("=")
        if not sep or not name or not prefix or not name.replace("_", "").isalnum():
            raise ValueError(f"--extra-valid-data-path wants NAME=PREFIX with NAME letters/digits/_, got {spec!r}")
        if name in out:
            raise ValueError(f"--extra-valid-data-path names {name!r} twice")
        out[name] = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    return out


def extra_valid_errors(args) -> list[str]:
    """Sets ``args.extra_valid`` ({NAME: PREFIX}) from ``--extra-valid-data-path``; returns what is wrong with it."""
    if not getattr(args, "extra_valid_data_path", None):
        args.extra_valid = {}
        return []
    try:
        args.extra_valid = parse_extra_valid(args.extra_valid_data_path)
    except ValueError as e:
        args.extra_valid = {}
        return [str(e)]
    missing = [f"{name}: {prefix}.bin/.idx" for name, prefix in args.extra_valid.items()
               if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"))]
    return [f"--extra-valid-data-path: no indexed dataset for {', '.join(missing)}"] if missing else []


def add_subset_arg(p, default: str) -> None:
    """``--subset {train,valid}`` of score / evaluate (their ``--split train|valid`` before ``--split`` took
    Megatron-LM's meaning is still read as it)."""
    p.add_argument("--subset", choices=("train", "valid"), default=default,
                   help=f"which part of the data: the training or the validation blend (default {default})")


def subset_blend(args, *, fall_back_to_train: bool = False) -> tuple[DataSources, Blend]:
    """score / evaluate: the data sources and the blend of ``--subset`` (``fall_back_to_train``: data without a
    validation part gives its training part)."""
    if args.split in ("train", "valid"):  # the old spelling of --subset
        args.subset, args.split = args.split, None
    sources = data_sources(args)
    if args.subset == "valid" and sources.valid is None and fall_back_to_train:
        args.subset = "train"
    if args.subset == "train":
        return sources, sources.train
    if sources.valid is None:
        raise DataError(f"{sources.train} has no valid split (prepare it with --valid-fraction, or give "
                        "--valid-data-path)")
    return sources, sources.valid
