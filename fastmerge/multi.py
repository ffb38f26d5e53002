"""Several merges in one YAML file, later ones built on earlier ones: mergekit-multi's format.

Each YAML document is a merge config with an optional `name`. A named merge is written to
INTERMEDIATE_DIR/<name>, the unnamed one (at most one) to the output path. Wherever a config
names a model (`base_model`, `models`, `slices` sources and bases, `tokenizer_source: model:`,
the `tokenizer:` block's source and token sources) by another merge's name, alone or as the
model of a LoRA reference (`name+adapter`), it means that merge's output, as in mergekit-multi.
The merges run in dependency order; a cycle is an error naming it.

Every config is checked before the first merge starts, so a typo in the last document costs
nothing. Lazy by default, like mergekit-multi: a merge whose output directory already holds a
model is skipped. fastmerge's outputs appear only when complete (built beside and renamed), so
a run that failed part-way resumes where it stopped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from .config import load_config, parse_yaml_documents
from .errors import ConfigError
from .io.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .io.lora import split_reference
from .methods import get_method
from .plan import check_parameter_names
from .vocab.build import MODEL_PREFIX


@dataclass
class PlannedMerge:
    """One document of a multi-merge file, its model names resolved to paths."""

    name: str | None
    config: dict[str, Any]
    out: Path
    needs: list[str]

    @property
    def label(self) -> str:
        return self.name or "final merge"


@dataclass
class MultiStep:
    """What happened to one merge: its report, or None where an existing output was kept."""

    merge: PlannedMerge
    report: Any

    def __str__(self) -> str:
        if self.report is None:
            return f"{self.merge.label}: kept the existing {self.merge.out}"
        return f"{self.merge.label}: {self.report}"


def load_multi(path: str | Path, intermediate_dir: str | Path, out_path: str | Path | None) -> list[PlannedMerge]:
    """The merges of a multi-merge file in the order they must run, every config validated."""
    documents = _read_documents(Path(path))
    intermediate = Path(intermediate_dir).expanduser().resolve()
    names = {doc.get("name") for doc in documents} - {None}
    merges: dict[str | None, PlannedMerge] = {}
    for index, document in enumerate(documents):
        name = document.pop("name", None)
        where = f"{path}: document {index + 1}" + (f" ({name})" if name else "")
        if name is None and out_path is None:
            raise ConfigError(f"{where}: an unnamed merge is written to the output path; give --out-path")
        if name in merges:
            raise ConfigError(f"{where}: " + (f"a second merge named {name!r}" if name else "a second unnamed merge; only one may be unnamed"))
        needs: list[str] = []
        try:
            config = _resolve_names(document, names, intermediate, needs)
            spec = load_config(config)
            check_parameter_names(spec, get_method(spec.merge_method))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        out = intermediate / name if name is not None else Path(out_path).expanduser()
        merges[name] = PlannedMerge(name, config, out, needs)
    return list(_in_dependency_order(merges, path))


def _read_documents(path: Path) -> list[dict[str, Any]]:
    try:
        documents = [doc for doc in parse_yaml_documents(path.read_text(encoding="utf-8")) if doc is not None]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the multi-merge config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not documents:
        raise ConfigError(f"{path}: no merge configs (YAML documents separated by ---)")
    for index, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: document {index + 1} is not a mapping (a merge config)")
        name = doc.get("name")
        if name is not None and not _is_plain_name(name):
            raise ConfigError(f"{path}: document {index + 1}: `name` {name!r} must be a plain directory name "
                              "(no '/', '\\', '+', and not '.' or '..')")
    return documents


def _is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\+\0")


def _resolve_names(document: dict[str, Any], names: set[str], intermediate: Path, needs: list[str]) -> dict[str, Any]:
    """A copy of `document` with every model reference to a merge name pointed at its output."""
    config = copy.deepcopy(document)

    def resolve(reference: Any) -> Any:
        if isinstance(reference, dict) and ("model" in reference or "path" in reference):
            key = "model" if "model" in reference else "path"  # mergekit's long forms
            return {**reference, key: resolve(reference[key])}
        if not isinstance(reference, str):
            return reference
        model, adapter = split_reference(reference)
        if model not in names:
            return reference
        if model not in needs:
            needs.append(model)
        return str(intermediate / model) + (f"+{adapter}" if adapter is not None else "")

    for holder, key in _model_reference_slots(config):
        holder[key] = resolve(holder[key])

    def resolve_tokenizer_source(source: Any) -> Any:
        """`base`, `union`, `model:PATH` or a bare PATH (parse_tokenizer_source's forms)."""
        if not isinstance(source, str) or source in ("base", "union"):
            return source
        if source.startswith(MODEL_PREFIX):
            return MODEL_PREFIX + resolve(source.removeprefix(MODEL_PREFIX).strip())
        return resolve(source)

    if "tokenizer_source" in config:
        config["tokenizer_source"] = resolve_tokenizer_source(config["tokenizer_source"])
    block = config.get("tokenizer")
    if isinstance(block, dict):
        if "source" in block:
            block["source"] = resolve_tokenizer_source(block["source"])
        for token in (block.get("tokens") or {}).values():
            if isinstance(token, dict) and "source" in token:
                token["source"] = resolve(token["source"])
    return config


def _model_reference_slots(config: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every place a merge config names a model."""
    if "base_model" in config:
        yield config, "base_model"
    for entries in [config.get("models")] + [s.get("sources") for s in _mappings(config.get("slices"))]:
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            yield (entry, "model") if isinstance(entry, dict) and "model" in entry else (entries, index)
    for out_slice in _mappings(config.get("slices")):
        if "base_model" in out_slice:
            yield out_slice, "base_model"


def _mappings(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _in_dependency_order(merges: dict[str | None, PlannedMerge], path: str | Path) -> Iterator[PlannedMerge]:
    """Depth first in document order, each merge after the ones it reads."""
    done: set[str | None] = set()
    visiting: list[str | None] = []

    def visit(name: str | None) -> Iterator[PlannedMerge]:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise ConfigError(f"{path}: the merges depend on each other in a cycle: {' -> '.join(str(n) for n in cycle)}")
        visiting.append(name)
        for need in merges[name].needs:
            yield from visit(need)
        visiting.pop()
        done.add(name)
        yield merges[name]

    for name in merges:
        yield from visit(name)


def has_model(directory: Path) -> bool:
    """Whether a directory holds a finished model (mergekit-multi's test for skipping a merge)."""
    return (directory / SAFETENSORS_SINGLE).is_file() or (directory / SAFETENSORS_INDEX).is_file()


def run_multi(config: str | Path, intermediate_dir: str | Path, out_path: str | Path | None = None, *,
              lazy: bool = True, **options: Any) -> list[MultiStep]:
    """Run every merge of a multi-merge file in dependency order; `options` go to `fastmerge.run`."""
    from .engine import run

    merges = load_multi(config, intermediate_dir, out_path)
    steps = []
    for merge in merges:
        if lazy and has_model(merge.out):
            steps.append(MultiStep(merge, None))
            continue
        merge.out.parent.mkdir(parents=True, exist_ok=True)
        steps.append(MultiStep(merge, run(merge.config, merge.out, **options)))
    return steps
