"""MkDocs hook: the generated pages of the site.

- ``reference/config.md``: every setting of the stages, from the dataclasses of ``rlhf_lightning/config/schema.py``
  (the one source): key, type, default, range and documentation. The documentation of a field is the string literal
  under it, read with ``ast``; the range is read from the checks of its class's ``__post_init__`` (``check_range``,
  ``check_choice``, ``check_bool``); the default is the dataclass's own (an instance is built). A field without a
  documentation string fails the build.
- ``reference/api/<package>.md``: one page per subpackage, with a mkdocstrings block for each of its modules, so a
  module added to the package appears without editing the docs.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlhf_lightning"
SCHEMA = "rlhf_lightning.config.schema"

#: (key in the run config, dataclass, what sets it)
SECTIONS = [
    ("reward", "RewardConfig", "`stage=reward`: the reward model's loss, data and optimizer."),
    ("value", "ValueConfig", "`stage=value`: the critic warm-up."),
    ("ppo", "PPOConfig", "`stage=ppo`: PPO and the critic-free estimators."),
    ("dpo", "DPOConfig", "`stage=dpo`: DPO, IPO and hinge."),
    ("policy_optim", "OptimConfig", "`stage=ppo`: the policy's optimizer (the critic's: `critic_optim`, the same "
                                    "settings; their defaults are set in `conf/stage/*.yaml`)."),
    ("model.lora", "LoRASettings", "every stage: LoRA adapters on the trained networks."),
    ("trainer.strategy", "FSDP2Settings", "`trainer=fsdp`, `trainer=fsdp_cpu`: FSDP2's sharding settings (the "
                                          "strategy's keyword arguments)."),
    ("eval", "EvalConfig", "`stage=ppo` and `stage=dpo`: judges of the held-out responses, evaluations along "
                           "training."),
]
#: checks of a setting against a list of names other than ``check_choice``: function -> the list's name in the
#: schema module (called as ``check(value, "name")``)
CHOICE_CHECKS = {"check_scheduler": "SCHEDULERS"}
#: the subpackages, in the order of the layers (the API pages; a package not named here comes last)
PACKAGES = ["algorithms", "config", "models", "data", "rollout", "rewards", "evaluation", "modules", "training"]


# ------------------------------------------------------------------------------------------------ config reference

def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal under it, for ``cls`` and its bases (the nearest class wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, after in zip(body, body[1:] + [None], strict=True):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _number(node: ast.AST, namespace: dict):
    return eval(compile(ast.Expression(node), "<bound>", "eval"), namespace)  # literals and module constants


def _describe_range(args: list, keywords: dict, namespace: dict) -> str:
    low = _number(args[2], namespace) if len(args) > 2 else keywords.get("low")
    high = _number(args[3], namespace) if len(args) > 3 else keywords.get("high")
    low_open = keywords.get("low_open", False)
    high_open = keywords.get("high_open", False)
    integer = keywords.get("integer", False)
    kind = "integer" if integer else "number"
    if integer and low == 1 and high is None and not low_open:
        return "integer ≥ 1"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '≥'} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '≤'} {high:g}"
    return kind


def _checks(cls: type, namespace: dict) -> dict[str, str]:
    """Field name -> its range, from the ``check_*`` calls of the ``__post_init__`` of ``cls`` and its bases."""
    ranges: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__post_init__")
        if init is None:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        loops: dict[int, list[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                try:
                    values = ast.literal_eval(node.iter)
                except ValueError:
                    values = None
                if isinstance(values, tuple) and all(isinstance(v, str) for v in values):
                    for inner in ast.walk(node):
                        loops[id(inner)] = list(values)
                elif isinstance(node.iter, ast.Tuple) and all(isinstance(e, ast.Tuple) for e in node.iter.elts):
                    for pair in node.iter.elts:  # for name, choices in (("a", A), ...)
                        name, choices = pair.elts
                        ranges[ast.literal_eval(name)] = "one of " + ", ".join(
                            f"`{c}`" for c in _number(choices, namespace))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            fn = node.func.id
            if fn in CHOICE_CHECKS and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                ranges[node.args[1].value] = "one of " + ", ".join(f"`{c}`" for c in namespace[CHOICE_CHECKS[fn]])
                continue
            if fn not in ("check_range", "check_choice", "check_bool") or not node.args:
                continue
            first = node.args[0]
            names = [first.value] if isinstance(first, ast.Constant) else loops.get(id(node), [])
            keywords = {k.arg: _number(k.value, namespace) for k in node.keywords}
            for name in names:
                if fn == "check_range":
                    ranges[name] = _describe_range(node.args, keywords, namespace)
                elif fn == "check_choice":
                    ranges[name] = "one of " + ", ".join(f"`{c}`" for c in _number(node.args[2], namespace))
                else:
                    ranges[name] = "`true` or `false`"
    return ranges


def _default(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")


def _type(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return " or ".join(f"`{'null' if part.strip() == 'None' else part.strip()}`" for part in text.split("|"))


def _cell(text: str) -> str:
    """A Markdown table cell: one line, pipes escaped, reST roles and literals as code."""
    text = ROLE.sub(lambda m: f"``{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}``", text)
    return " ".join(text.split()).replace("|", "&#124;").replace("``", "`")


def _rows(prefix: str, cls: type, instance, namespace: dict, out: list[str], missing: list[str]) -> list[tuple]:
    docs, ranges = _field_docs(cls), _checks(cls, namespace)
    nested = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        value = getattr(instance, f.name)
        doc = docs.get(f.name)
        if not doc:
            missing.append(key)
            doc = ""
        if dataclasses.is_dataclass(value):
            out.append(f"| `{key}` | `{type(value).__name__}` | see below | | {_cell(doc)} |")
            nested.append((key, type(value), value))
            continue
        out.append(f"| `{key}` | {_type(f.type)} | {_default(value)} | {ranges.get(f.name, '')} | {_cell(doc)} |")
    return nested


def config_reference() -> str:
    sys.path.insert(0, str(ROOT))
    schema = importlib.import_module(SCHEMA)
    namespace = vars(schema)
    lines = [
        "# Config reference",
        "",
        "Every setting of the stages, generated from the settings dataclasses of "
        "[`rlhf_lightning/config/schema.py`](api/config.md) when the site is built: the key as the run config and "
        "the command line name it, its type, its default, its range (checked before anything loads: a value outside "
        "it stops the run with one line naming the key) and the documentation written under the field. "
        "`python train.py stage=ppo --cfg job` prints a run's whole config.",
        "",
        "The rest of the run config (the model, the data, the trainer, the loggers, `seed`, `iterations`, "
        "`batch_size`, ...) is plain YAML under `conf/`: see [Concepts](../concepts.md#the-config).",
        "",
    ]
    missing: list[str] = []
    for key, name, what in SECTIONS:
        cls = getattr(schema, name)
        lines += [f"## `{key}`", "", f"{what} `{name}`: {_cell(inspect.cleandoc(cls.__doc__ or ''))}", ""]
        queue = [(key, cls, cls())]
        while queue:
            prefix, klass, instance = queue.pop(0)
            if prefix != key:
                lines += [f"### `{prefix}`", "", _cell(inspect.cleandoc(klass.__doc__ or "")), ""]
            lines += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
            queue += _rows(prefix, klass, instance, namespace, lines, missing)
            lines.append("")
    if missing:
        raise PluginError(f"config reference: settings without documentation in {SCHEMA}: {', '.join(missing)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ API reference

def _modules(package: str) -> list[str]:
    folder = PACKAGE / package
    return [f"rlhf_lightning.{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]


def api_pages() -> dict[str, str]:
    packages = PACKAGES + sorted(p.name for p in PACKAGE.iterdir()
                                 if (p / "__init__.py").is_file() and p.name not in PACKAGES)
    pages = {}
    index = ["# API reference", "", "Generated from the docstrings. The package root gives the names most users need "
             "(`from rlhf_lightning import PPOModule, ppo_policy_loss`):", "",
             "::: rlhf_lightning", "    options:", "      members: false", "", "## Packages", ""]
    for package in packages:
        if not (PACKAGE / package / "__init__.py").is_file():
            continue
        index.append(f"- [`rlhf_lightning.{package}`]({package}.md)")
        body = [f"# `rlhf_lightning.{package}`", "", f"::: rlhf_lightning.{package}", "    options:",
                "      members: false", "      show_root_heading: false", ""]
        for module in _modules(package):
            body += [f"::: {module}", ""]
        pages[f"reference/api/{package}.md"] = "\n".join(body)
    commands = [p.stem for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"]
    if commands:
        index += ["", "## Commands", "", "Kept at the package's top so that the commands stay short: "
                  + ", ".join(f"`python -m rlhf_lightning.{c}`" for c in commands) + "."]
    pages["reference/api/index.md"] = "\n".join(index) + "\n"
    return pages


def on_files(files, config):
    generated = {"reference/config.md": config_reference(), **api_pages()}
    for uri, content in generated.items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))
    return files
