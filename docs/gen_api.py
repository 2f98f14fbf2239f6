"""Write docs/api.md from netpoll's docstrings and signatures.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date
    python docs/gen_api.py --stdout   # print instead of writing

Every name in ``netpoll.__all__`` gets a section: its signature (from
``inspect.signature``, or from the first docstring line that Cython's
``embedsignature`` writes), its docstring, and for classes every public
method and property with theirs.
"""
from __future__ import annotations

import enum
import inspect
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

import netpoll

OUT = Path(__file__).resolve().parent / "api.md"

GROUPS = [
    ("Server", ["EventLoop", "Listener", "create_listener", "serve"]),
    ("Client", ["Dialer", "dial_connection"]),
    ("Connections and buffers", ["Connection", "ConnReader", "ConnWriter", "LinkBuffer"]),
    ("Reactor (goev's model)", ["Reactor", "EvHandler", "Acceptor", "Connector", "ConnectPool",
                                "EV_IN", "EV_OUT", "EV_ET", "EV_IN_ET", "EV_OUT_ET"]),
    ("Configuration and diagnostics", ["configure", "set_num_loops", "set_load_balance",
                                       "LoadBalance", "stats", "__version__"]),
    ("Errors", ["NetpollError", "ConnectionClosedError", "PeerClosedError", "ReadTimeoutError",
                "WriteTimeoutError", "DialTimeoutError", "BufferUnderflowError",
                "BufferClosedError"]),
]

_ADDR = re.compile(r" at 0x[0-9a-f]+")


def _embedded(obj: Any, name: str) -> tuple[Optional[str], str]:
    """(signature, rest of docstring) when Cython put 'name(args)' first."""
    doc = inspect.getdoc(obj) or ""
    first, _, rest = doc.partition("\n")
    m = re.match(rf"^(?:\w+\.)*{re.escape(name)}(\(.*\))(?:\s*->\s*(.+))?$", first.strip())
    if m:
        sig = m.group(1) + (f" -> {m.group(2)}" if m.group(2) else "")
        return sig, rest.strip()
    return None, doc


def _signature(obj: Any, name: str) -> tuple[str, str]:
    sig, doc = _embedded(obj, name)
    if sig is None:
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = "(...)"
    sig = re.sub(r"^\(self,?\s*", "(", sig)
    sig = re.sub(r"(: |-> )'([^']*)'", r"\1\2", sig)      # string annotations, unquoted
    return _ADDR.sub("", sig), doc


def _doc(text: str) -> List[str]:
    text = inspect.cleandoc(text) if text else ""
    return [text, ""] if text else ["*(no docstring)*", ""]


def _members(cls: type) -> List[str]:
    names = []
    for name in sorted(dir(cls)):
        if name.startswith("_") or name in vars(object):
            continue
        if issubclass(cls, BaseException) and hasattr(BaseException, name):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner is object or owner.__module__ == "builtins":
            continue
        if owner is not cls and getattr(netpoll, owner.__name__, None) is owner:
            continue                  # documented with the public base class
        names.append(name)
    return names


def _class(name: str, cls: type) -> List[str]:
    out: List[str] = []
    if issubclass(cls, enum.Enum):
        out += [f"### `{name}`", "", *_doc(cls.__doc__ or "")]
        out += [f"- `{m.name}` = `{m.value!r}`" for m in cls] + [""]
        return out
    bases = [b.__name__ for b in cls.__bases__ if b is not object
             and (b.__module__ == "builtins" or getattr(netpoll, b.__name__, None) is b)]
    head = f"### `class {name}" + (f"({', '.join(bases)})" if bases else "") + "`"
    if issubclass(cls, BaseException):
        return [head, "", *_doc(cls.__doc__ or "")]
    init_sig: Optional[str] = ""
    if "__init__" in vars(cls) or any("__init__" in vars(b) for b in cls.__mro__[1:-1]):
        init_sig, _ = _signature(cls.__init__, "__init__")
    # Cython's embedsignature puts "Name(args)" first in a class docstring.
    embedded, class_doc = _embedded(cls, name)
    if embedded is not None:
        init_sig = embedded
    if init_sig is None or "*args, **kwargs" in init_sig or init_sig == "(...)":
        init_sig = ""                 # not constructed by users
    out += [head, ""]
    if init_sig:
        out += ["```python no-run", f"{name}{init_sig}", "```", ""]
    out += _doc(class_doc)
    public_bases = [b.__name__ for b in cls.__mro__[1:] if getattr(netpoll, b.__name__, None) is b]
    if public_bases:
        out += ["Also has the methods of " + ", ".join(f"`{b}`" for b in public_bases) + ".", ""]
    for m in _members(cls):
        attr = inspect.getattr_static(cls, m)
        if isinstance(attr, (property,)) or type(attr).__name__ == "getset_descriptor":
            out += [f"#### `{name}.{m}` *(property)*", "", *_doc(attr.__doc__ or "")]
        elif callable(attr) or isinstance(attr, (staticmethod, classmethod)):
            fn = getattr(cls, m)
            sig, doc = _signature(fn, m)
            out += [f"#### `{name}.{m}{sig}`", "", *_doc(doc)]
        else:
            out += [f"#### `{name}.{m}` *(attribute)*", "", *_doc(getattr(attr, "__doc__", ""))]
    return out


def render() -> str:
    out = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.",
        f"netpoll {netpoll.__version__}. Times are in seconds (float); `None` means no limit.",
        "",
    ]
    listed = [n for _, names in GROUPS for n in names]
    missing = sorted(set(netpoll.__all__) - set(listed))
    groups = GROUPS + ([("Other", missing)] if missing else [])
    out += ["## Contents", ""]
    for title, names in groups:
        anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
        out.append(f"- [{title}](#{anchor}): " + ", ".join(f"`{n}`" for n in names))
    out.append("")
    for title, names in groups:
        out += [f"## {title}", ""]
        for name in names:
            obj = getattr(netpoll, name)
            if isinstance(obj, type):
                out += _class(name, obj)
            elif callable(obj):
                sig, doc = _signature(obj, name)
                out += [f"### `{name}{sig}`", "", *_doc(doc)]
            else:
                out += [f"### `{name}` = `{obj!r}`", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: List[str]) -> int:
    text = render()
    if "--stdout" in argv:
        sys.stdout.write(text)
        return 0
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
