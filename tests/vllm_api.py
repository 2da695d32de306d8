"""The real vLLM API, read with `ast` from the pinned release's wheel (a zip): no install, no GPU.

`VllmSource`: does class C of module M have member / method / keyword X (re-exports and bases
followed). `adapter_uses`: every vLLM name an adapter uses, from its vLLM imports and from names
annotated with vLLM classes. `check_uses`: each use the real release does not support.
"""
from __future__ import annotations

import ast
import difflib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# LLM.collective_rpc(method) runs Worker.<method>. Worker.reload_weights forwards *args/**kwargs
# to the model runner, V1 or V2 (vLLM picks one at start-up), so its keywords must suit both.
RPC_WORKER = ("vllm.v1.worker.gpu_worker", "Worker")
RPC_FORWARDS = {"reload_weights": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                                   ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")]}
FuncDef = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class Sig:
    positional: list[str]  # self / cls dropped
    keywords: set[str]
    var_args: bool = False
    var_kwargs: bool = False


def func_sig(fn: ast.FunctionDef, bound: bool = True) -> Sig:
    a = fn.args
    posonly, normal = [x.arg for x in a.posonlyargs], [x.arg for x in a.args]
    if bound and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
        posonly, normal = (posonly[1:], normal) if posonly else (posonly, normal[1:])
    return Sig(posonly + normal, set(normal) | {x.arg for x in a.kwonlyargs},
               a.vararg is not None, a.kwarg is not None)


def _named(node: ast.AST, name: str) -> bool:
    node = node.value if isinstance(node, ast.Subscript) else node
    node = node.func if isinstance(node, ast.Call) else node  # @dataclass(frozen=True)
    return getattr(node, "id", None) == name or getattr(node, "attr", None) == name


def _targets(st: ast.AST) -> list[ast.AST]:
    return st.targets if isinstance(st, ast.Assign) else [st.target]


@dataclass(eq=False)
class ClassInfo:
    module: str
    node: ast.ClassDef
    bases: list["ClassInfo"] = field(default_factory=list)

    def mro(self) -> list["ClassInfo"]:
        out = [self]
        for b in self.bases:
            out += [c for c in b.mro() if c not in out]
        return out

    def own(self, name: str) -> Optional[ast.FunctionDef]:
        return next((st for st in self.node.body if isinstance(st, FuncDef) and st.name == name), None)

    def method(self, name: str) -> Optional[ast.FunctionDef]:
        return next((m for c in self.mro() if (m := c.own(name))), None)

    def fields(self) -> list[str]:
        """Annotated class-level fields (dataclass, msgspec, TypedDict, pydantic), bases first."""
        out: list[str] = []
        for c in reversed(self.mro()):
            out += [st.target.id for st in c.node.body if isinstance(st, ast.AnnAssign)
                    and isinstance(st.target, ast.Name) and not _named(st.annotation, "ClassVar")
                    and st.target.id not in out]
        return out

    def members(self) -> set[str]:
        out: set[str] = set()
        for c in self.mro():
            for st in c.node.body:
                if isinstance(st, (*FuncDef, ast.ClassDef)):
                    out.add(st.name)
                elif isinstance(st, (ast.AnnAssign, ast.Assign)):
                    out |= {t.id for t in _targets(st) if isinstance(t, ast.Name)}
            out |= {n.attr for n in ast.walk(c.node) if isinstance(n, ast.Attribute)  # self.x = ...
                    and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) and n.value.id == "self"}
        return out

    def abstract(self) -> set[str]:
        return {st.name for c in self.mro() for st in c.node.body
                if isinstance(st, FuncDef) and any(_named(d, "abstractmethod") for d in st.decorator_list)}


class VllmSource:
    def __init__(self, wheel: Path):
        self.zip = zipfile.ZipFile(wheel)
        self.names = set(self.zip.namelist())
        self._ast: dict[str, Optional[ast.Module]] = {}

    def _path(self, mod: str) -> Optional[str]:
        base = mod.replace(".", "/")
        return next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in self.names), None)

    def module(self, mod: str) -> Optional[ast.Module]:
        if mod not in self._ast:
            path = self._path(mod)
            self._ast[mod] = None if path is None else ast.parse(self.zip.read(path).decode())
        return self._ast[mod]

    def resolve(self, mod: str, name: str, depth: int = 0) -> Optional[tuple[str, ast.AST]]:
        """(defining module, node) of the top-level `name` of `mod`, following re-exports."""
        tree = self.module(mod)
        for st in tree.body if tree is not None and depth < 8 else []:
            if isinstance(st, (*FuncDef, ast.ClassDef)) and st.name == name:
                return mod, st
            if isinstance(st, (ast.Assign, ast.AnnAssign)) and any(
                    isinstance(t, ast.Name) and t.id == name for t in _targets(st)):
                return mod, st
            if isinstance(st, ast.ImportFrom) and any((a.asname or a.name) == name for a in st.names):
                alias = next(a for a in st.names if (a.asname or a.name) == name)
                return self.resolve(self._absolute(mod, st), alias.name, depth + 1)
        return None

    def _absolute(self, mod: str, st: ast.ImportFrom) -> str:
        if not st.level:
            return st.module or ""
        pkg = mod if (self._path(mod) or "").endswith("__init__.py") else mod.rpartition(".")[0]
        for _ in range(st.level - 1):
            pkg = pkg.rpartition(".")[0]
        return f"{pkg}.{st.module}" if st.module else pkg

    def class_info(self, mod: str, name: str) -> Optional[ClassInfo]:
        found = self.resolve(mod, name)
        if found is None or not isinstance(found[1], ast.ClassDef):
            return None
        info = ClassInfo(*found)
        for b in found[1].bases:
            b = b.value if isinstance(b, ast.Subscript) else b  # Base[T]
            if isinstance(b, ast.Name) and (base := self.class_info(found[0], b.id)) is not None:
                info.bases.append(base)
        return info

    def init_sig(self, cls: ClassInfo) -> Sig:
        """Constructor parameters. A dataclass-like class takes its fields; an __init__ that passes
        **kwargs on to another vLLM class (LLM -> EngineArgs) also takes that class's keywords."""
        for c in cls.mro():
            if any(_named(d, "dataclass") or _named(d, "config") for d in c.node.decorator_list):
                break
            if (init := c.own("__init__")) is None:
                continue
            sig = func_sig(init)
            for call in (n for n in ast.walk(init) if sig.var_kwargs and isinstance(n, ast.Call)):
                forwards = any(k.arg is None and getattr(k.value, "id", 0) == init.args.kwarg.arg
                               for k in call.keywords)
                if forwards and isinstance(call.func, ast.Name) \
                        and (target := self.class_info(c.module, call.func.id)) is not None:
                    sig.keywords |= self.init_sig(target).keywords
                    sig.var_kwargs = False
            return sig
        names = cls.fields()
        return Sig(names, set(names))


@dataclass
class Use:
    kind: str          # import | call | method | attr | rpc | override
    module: str        # where the adapter imports the vLLM name from
    name: str          # the vLLM class or function
    member: str = ""   # method / attribute / RPC name
    keywords: tuple = ()  # call keywords (override: the methods we define)
    n_positional: int = 0
    where: str = ""


def _annotation_name(ann: Optional[ast.AST]) -> Optional[str]:
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        ann = ast.parse(ann.value, mode="eval").body
    return ann.id if isinstance(ann, ast.Name) else None


def adapter_uses(files: list[Path]) -> list[Use]:
    """Every vLLM import, constructor call, method call, attribute, RPC and override in `files`."""
    trees = {f: ast.parse(f.read_text()) for f in files}
    bound: dict[str, tuple[str, str]] = {}      # local name -> (vLLM module, name), any scope
    self_types: dict[str, dict[str, str]] = {}  # our class -> {attribute: local vLLM name}
    our_bases: dict[str, list[str]] = {}
    uses: list[Use] = []
    for f, tree in trees.items():
        for node in (n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)):
            if (node.module or "").startswith("vllm"):
                for a in node.names:
                    bound[a.asname or a.name] = (node.module, a.name)
                    uses.append(Use("import", node.module, a.name, where=f"{f.name}:{node.lineno}"))
    for tree in trees.values():
        for node in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            our_bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
            self_types[node.name] = {st.target.id: n for st in node.body if isinstance(st, ast.AnnAssign)
                                     and isinstance(st.target, ast.Name)
                                     and (n := _annotation_name(st.annotation)) in bound}

    def self_attr_type(cls: Optional[str], attr: str) -> Optional[str]:
        if cls is None or attr in self_types.get(cls, {}):
            return cls and self_types[cls][attr]
        return next((t for b in our_bases.get(cls, []) if (t := self_attr_type(b, attr))), None)

    def visit(f: Path, node: ast.AST, cls: Optional[str], typed: dict[str, str]) -> None:
        where = f"{f.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            cls = node.name
            for b in (b for b in node.bases if isinstance(b, ast.Name) and b.id in bound):
                methods = tuple(st.name for st in node.body if isinstance(st, FuncDef))
                uses.append(Use("override", *bound[b.id], keywords=methods, where=where))
        if isinstance(node, FuncDef):  # annotated arguments and `name: VllmClass` declarations
            typed = dict(typed)
            for st in ast.walk(node):
                if isinstance(st, (ast.arg, ast.AnnAssign)) and (n := _annotation_name(st.annotation)) in bound:
                    typed[st.arg if isinstance(st, ast.arg) else getattr(st.target, "id", "")] = n

        def type_of(expr: ast.AST) -> Optional[str]:
            if isinstance(expr, ast.Name):
                return typed.get(expr.id) or (expr.id if expr.id in bound else None)
            if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
                return self_attr_type(cls, expr.attr)
            return None

        if isinstance(node, ast.Call):
            kws, fn, npos = tuple(k.arg for k in node.keywords if k.arg), node.func, len(node.args)
            if isinstance(fn, ast.Name) and fn.id in bound:
                uses.append(Use("call", *bound[fn.id], keywords=kws, n_positional=npos, where=where))
            elif isinstance(fn, ast.Attribute) and (t := type_of(fn.value)):
                skip.add(id(fn))  # the method use covers this attribute
                uses.append(Use("method", *bound[t], fn.attr, kws, npos, where))
                if fn.attr == "collective_rpc" and node.args and isinstance(node.args[0], ast.Constant):
                    kw = next((k.value for k in node.keywords if k.arg == "kwargs"), None)
                    keys = tuple(k.value for k in kw.keys) if isinstance(kw, ast.Dict) else ()
                    uses.append(Use("rpc", *RPC_WORKER, member=node.args[0].value, keywords=keys, where=where))
        elif isinstance(node, ast.Attribute) and id(node) not in skip and (t := type_of(node.value)):
            uses.append(Use("attr", *bound[t], member=node.attr, where=where))
        for child in ast.iter_child_nodes(node):
            visit(f, child, cls, typed)

    skip: set[int] = set()
    for f, tree in trees.items():
        visit(f, tree, None, {})
    return uses


def check_uses(src: VllmSource, uses: list[Use]) -> list[str]:
    """One message per use that the real vLLM source does not support."""
    errors: list[str] = []

    def check_sig(sig: Sig, u: Use, what: str) -> None:
        for k in u.keywords:
            if k not in sig.keywords and not sig.var_kwargs:
                close = difflib.get_close_matches(k, sig.keywords, n=3)
                hint = f"; did you mean {close}?" if close else ""
                errors.append(f"{u.where}: {what} takes no keyword {k!r}{hint}")
        if u.n_positional > len(sig.positional) and not sig.var_args:
            errors.append(f"{u.where}: {what} takes {len(sig.positional)} positional, got {u.n_positional}")

    for u in uses:
        found = src.resolve(u.module, u.name)
        cls = src.class_info(u.module, u.name)
        if found is None:
            errors.append(f"{u.where}: {u.module}.{u.name} does not exist in vLLM")
        elif u.kind == "call":
            check_sig(src.init_sig(cls) if cls else func_sig(found[1], bound=False), u, f"{u.name}()")
        elif u.kind != "import" and cls is None:
            errors.append(f"{u.where}: {u.module}.{u.name} is not a class")
        elif u.kind in ("method", "rpc") and (m := cls.method(u.member)) is None:
            errors.append(f"{u.where}: {u.name} has no method {u.member}")
        elif u.kind == "method":
            check_sig(func_sig(m), u, f"{u.name}.{u.member}()")
        elif u.kind == "rpc":  # the worker method, or the model runners it forwards **kwargs to
            targets = RPC_FORWARDS.get(u.member, []) if func_sig(m).var_kwargs else [(u.module, u.name)]
            for mod, name in targets:
                rm = (runner := src.class_info(mod, name)) and runner.method(u.member)
                if not rm:
                    errors.append(f"{u.where}: {mod}.{name} has no method {u.member}")
                else:
                    check_sig(func_sig(rm), u, f"{mod}.{name}.{u.member}()")
        elif u.kind == "attr" and u.member not in cls.members():
            errors.append(f"{u.where}: {u.name} has no attribute {u.member}")
        elif u.kind == "override":
            members = cls.members()
            errors += [f"{u.where}: {u.name} has no method {m} to override"
                       for m in u.keywords if not m.startswith("_") and m not in members]
            errors += [f"{u.where}: abstract {u.name}.{m} not implemented"
                       for m in cls.abstract() - set(u.keywords)]
    return errors
