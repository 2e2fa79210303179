"""A small, strict parser of the Prometheus text exposition format 0.0.4, for tests (no extra dependency).

Stricter than Prometheus itself where that catches our mistakes: HELP/TYPE at most once per family and
before its samples, a family's lines in one group, no duplicate series, only the documented escapes, float
syntax as Go parses it, non-negative counters, a final newline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT_RE = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|Inf)|NaN")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
ESCAPES = {"\\": "\\", "n": "\n", '"': '"'}


class ExpositionError(ValueError):
    pass


@dataclass
class Family:
    name: str
    help: str | None = None
    type: str = "untyped"
    typed: bool = False
    samples: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def value(self, **labels: str) -> float:
        return self.samples[tuple(sorted(labels.items()))]


def _unescape(text: str, allowed: str, line_no: int) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1: i + 2]
            if nxt not in allowed or nxt == "":
                raise ExpositionError(f"line {line_no}: bad escape \\{nxt}")
            out.append(ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _labels(text: str, line_no: int) -> tuple[dict[str, str], str]:
    """Parse ``{a="x",b="y"}`` at the start of ``text``; returns the labels and the rest of the line."""
    labels: dict[str, str] = {}
    i = 1
    while text[i: i + 1] != "}":
        m = LABEL_RE.match(text, i)
        if not m or text[m.end(): m.end() + 2] != '="':
            raise ExpositionError(f"line {line_no}: bad label at {text[i:]!r}")
        j = m.end() + 2
        raw = []
        while j < len(text) and text[j] != '"':
            raw.append(text[j: j + 2] if text[j] == "\\" else text[j])
            j += 2 if text[j] == "\\" else 1
        if j >= len(text):
            raise ExpositionError(f"line {line_no}: unterminated label value")
        if m.group() in labels:
            raise ExpositionError(f"line {line_no}: label {m.group()} repeated")
        labels[m.group()] = _unescape("".join(raw), '\\n"', line_no)
        i = j + 1
        if text[i: i + 1] == ",":
            i += 1
            if text[i: i + 1] == "}":
                raise ExpositionError(f"line {line_no}: trailing comma in labels")
        elif text[i: i + 1] != "}":
            raise ExpositionError(f"line {line_no}: expected , or }} after a label")
    return labels, text[i + 1:]


def parse(text: str) -> dict[str, Family]:
    """Metric families by name; raises ExpositionError on anything the format does not allow."""
    if text and not text.endswith("\n"):
        raise ExpositionError("exposition must end with a newline")
    families: dict[str, Family] = {}
    done: set[str] = set()  # families whose group of lines has ended
    current: str | None = None

    def family(name: str, line_no: int) -> Family:
        nonlocal current
        if name != current:
            if name in done:
                raise ExpositionError(f"line {line_no}: lines of {name} are not in one group")
            if current is not None:
                done.add(current)
            current = name
        return families.setdefault(name, Family(name))

    for line_no, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                if not NAME_RE.fullmatch(parts[2]):
                    raise ExpositionError(f"line {line_no}: bad metric name {parts[2]!r}")
                f = family(parts[2], line_no)
                rest = parts[3] if len(parts) == 4 else ""
                if parts[1] == "HELP":
                    if f.help is not None:
                        raise ExpositionError(f"line {line_no}: second HELP for {f.name}")
                    f.help = _unescape(rest, "\\n", line_no)
                else:
                    if f.typed or f.samples:
                        raise ExpositionError(f"line {line_no}: TYPE of {f.name} repeated or after samples")
                    if rest not in TYPES:
                        raise ExpositionError(f"line {line_no}: unknown type {rest!r}")
                    f.type, f.typed = rest, True
            continue
        m = NAME_RE.match(line)
        if not m:
            raise ExpositionError(f"line {line_no}: no metric name in {line!r}")
        name, rest = m.group(), line[m.end():]
        labels, rest = _labels(rest, line_no) if rest.startswith("{") else ({}, rest)
        fields = rest.split(" ")
        if len(fields) not in (2, 3) or fields[0] != "" or not FLOAT_RE.fullmatch(fields[1]) or (
                len(fields) == 3 and not re.fullmatch(r"-?\d+", fields[2])):
            raise ExpositionError(f"line {line_no}: bad sample {line!r}")
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            stem = name.removesuffix(suffix)
            if stem != name and families.get(stem) and families[stem].type in ("histogram", "summary"):
                base = stem
        f = family(base, line_no)
        value = float(fields[1])
        if f.type == "counter" and (math.isnan(value) or value < 0):
            raise ExpositionError(f"line {line_no}: counter {name} is {fields[1]}")
        key = tuple(sorted(labels.items()))
        if base != name:
            key = (("__name__", name), *key)
        if key in f.samples:
            raise ExpositionError(f"line {line_no}: duplicate series {line!r}")
        f.samples[key] = value
    return families
