"""Every Slicer, MRML, VTK, CTK and Qt name the module uses exists in every Slicer version it supports.

The module is developed and tested against the PyPI ``slicer-core`` package, which follows Slicer's
main branch (5.13), while users run released Slicer. A method added in 5.13 (or, like
``vtkSegment.SetTerminology``, in 5.10) passes every other test here and fails in the user's Slicer.
This test reads the module's sources as they are now (``ast``, and the ``.ui`` XML) and looks each use
up in ``Testing/data/slicer_api_<version>.json``: the public API of that Slicer release read from its
source by ``Testing/tools/dump_slicer_api.py`` (C++ classes with their bases, Qt properties, signals
and slots, Slicer's Python package with its functions' parameters, VTK and CTK at the commits that
release pins, Qt 5.15's QObject classes).

What is checked, by how much is known about the object:

* ``slicer.X``, ``slicer.util.X``, ``slicer.modules.X``, ``vtk.X``, ``ctk.X``, ``qt.X`` and names imported
  from ``slicer.*`` / ``vtk.util``: looked up in that module's list; keyword arguments and the number of
  positional ones in calls of Slicer's Python functions and methods.
* Objects of a known class, followed through the code: constructed (``slicer.vtkOrientedImageData()``),
  returned by a method whose C++ declaration names the class (``node.GetSegmentation()``: that class or
  a subclass), ``slicer.app`` (qSlicerApplication), ``slicer.mrmlScene`` (vtkMRMLScene), the panel's
  widgets (``self.ui.<name>``, class from the ``.ui``), the module's own classes through their Slicer
  bases (``self.delayDisplay``, ``self.parent.title``), ``@parameterNodeWrapper`` instances, scripted
  modules' widgets (``slicer.modules.SegmentEditorWidget.editor``). Their attributes are looked up in the
  class and its bases; ``obj.connect("signal(...)", ...)`` checks the signal.
* Any other object: a CamelCase attribute (``segment.SetTerminology(...)``) is a VTK/MRML-style method
  or constant, and must exist in *some* Slicer or VTK class of that version.
* The ``.ui``: every custom widget class, every ``<property>`` (not ``stdset="0"`` dynamic ones),
  ``Class::Value`` enum values and ``<connection>`` signals and slots; ``self.ui.<name>`` must be in it.

Code the module guards itself is not reported where the name is absent: the body of
``if hasattr(obj, "name"):`` and imports in ``try:`` blocks that catch ImportError (attributes in those
that catch AttributeError), e.g. ``import slicer.packaging`` (Slicer >= 5.12).

Not checked (the allowlist, each with its reason): the standard library, numpy and the project's own
packages (not Slicer); ``PyTorchUtils`` (an optional extension, not part of Slicer; its import is guarded
by ``ModuleNotFoundError``); lowercase attributes of objects of unknown class (Python objects: only
VTK/MRML-style names can be told apart); the few names PythonQt adds to every QObject
(``PYTHONQT_QOBJECT_EXTRAS``); the members of Qt classes outside the QObject tree of QtCore/QtGui/
QtWidgets (QColor, QTableWidgetItem ...: listed by name only). Qt itself is listed from Qt 5.15's
headers: Slicer 5.10 and 5.12 both build with Qt 5.15 by default.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import unittest
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

from MedicalSAM3Lib.compatibility import SUPPORTED as _SUPPORTED, version_text

# The Slicer versions the module supports (MedicalSAM3Lib/compatibility.py, which the module uses to
# refuse older ones). Each needs Testing/data/slicer_api_<version>.json.
SUPPORTED = tuple(version_text(version) for version in _SUPPORTED)
UNSUPPORTED_LISTED = "5.8"  # listed only to show that the check catches what 5.10 added

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedicalSAM3Slicer"
DATA = ROOT / "Testing" / "data"
TOOL = ROOT / "Testing" / "tools" / "dump_slicer_api.py"
MODULE_FILE = MODULE_DIR / "MedicalSAM3.py"  # the scripted module; its name is the Slicer module's name

# Modules whose names are looked up; anything else imported (standard library, numpy, the project's own
# packages, the optional PyTorchUtils extension) is not Slicer and is not checked.
SLICER_MODULES = ("slicer", "vtk", "qt", "ctk")
# Attribute types of Slicer's Python base classes that their source does not spell out: the C++ module
# (qSlicerScriptedLoadableModule[Widget]) passes itself as ``parent``; ``layout`` is the parent's Qt layout.
SLICER_PYTHON_ATTRIBUTE_TYPES = {
    ("ScriptedLoadableModule", "parent"): "qSlicerScriptedLoadableModule",
    ("ScriptedLoadableModuleWidget", "parent"): "qSlicerScriptedLoadableModuleWidget",
    ("ScriptedLoadableModuleWidget", "layout"): "QVBoxLayout",
}
# PythonQt (Slicer's Qt/Python bridge) gives every QObject these, besides its properties, signals, slots and
# methods: PythonQtStdDecorators and the instance wrapper. (Qt's own findChild/findChildren are templates.)
PYTHONQT_QOBJECT_EXTRAS = {"className", "connect", "disconnect", "findChild", "findChildren", "help", "delete",
                           "children", "parent", "setParent", "inherits", "tr"}
# Slicer's Python functions whose result type the test follows
SLICER_PYTHON_RESULTS = {("slicer.util", "childWidgetVariables"): "ui", ("slicer.util", "loadUI"): "ui-root"}
MEMBER_KINDS = ("methods", "constants", "properties", "signals", "slots")


# ------------------------------------------------------------------------------------------ API lists
class Api:
    def __init__(self, version: str, data: dict):
        self.version, self.data = version, data
        self.classes: dict = data["classes"]
        self.python: dict = data["python"]
        self.modules: dict = data["modules"]
        self.vtk_python: dict = data["vtk_python"]
        self.commit = data["slicer"]["commit"]
        self.has_qt = bool(data.get("qt"))
        self.all_names = set()  # VTK/MRML-style names, for objects of unknown class
        for entry in self.classes.values():
            if entry["file"].startswith(("Slicer:", "VTK:")):
                for kind in ("methods", "constants"):
                    self.all_names.update(entry.get(kind, ()))
        self.module_names = {name.lower(): name for name in self.modules}
        self.descendants: dict[str, set[str]] = {}
        for name, entry in self.classes.items():
            for base in entry["bases"]:
                self.descendants.setdefault(base, set()).add(name)
        # a method's result class when every class that declares the method agrees (node.GetSegmentation())
        results: dict[str, set] = {}
        for entry in self.classes.values():
            for method in entry.get("methods", ()):
                results.setdefault(method, set()).add(entry.get("returns", {}).get(method))
        self.global_returns = {m: next(iter(r)) for m, r in results.items() if len(r) == 1 and next(iter(r))}

    def subclasses(self, cls: str) -> list[str]:
        out, todo = [], list(self.descendants.get(cls, ()))
        while todo:
            name = todo.pop()
            if name not in out:
                out.append(name)
                todo.extend(self.descendants.get(name, ()))
        return sorted(out)

    def origin(self, cls: str) -> str:
        return self.classes[cls]["file"].split(":", 1)[0]

    def lookup(self, cls: str, name: str, kinds=MEMBER_KINDS, _seen=None) -> str:
        """"found", "qt" (reached a Qt class, not listed: allowed), "unknown" (a base that is not listed)
        or "missing"."""
        if cls not in self.classes:
            return "qt" if re.match(r"^Q[A-Z]", cls) and not self.has_qt else "unknown"
        entry = self.classes[cls]
        if any(name in entry.get(kind, ()) for kind in kinds):
            return "found"
        results = [self.lookup(base, name, kinds) for base in entry["bases"]]
        for result in ("found", "qt", "unknown"):
            if result in results:
                return result
        return "missing"

    def derives(self, cls: str, base: str) -> bool:
        entry = self.classes.get(cls)
        return cls == base or (entry is not None and any(self.derives(b, base) for b in entry["bases"]))

    def returns(self, cls: str, name: str) -> str | None:
        entry = self.classes.get(cls)
        if entry is None:
            return None
        if any(name in entry.get(kind, ()) for kind in MEMBER_KINDS):
            return entry.get("returns", {}).get(name)
        for base in entry["bases"]:
            found = self.returns(base, name)
            if found:
                return found
        return None


@lru_cache(maxsize=None)
def load_api(version: str) -> Api:
    path = DATA / f"slicer_api_{version}.json"
    return Api(version, json.loads(path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------ the module
def module_sources() -> list[Path]:
    """The module file, its library and the Segment Editor effects it registers (``SegmentEditor*Lib``)."""
    return [MODULE_FILE] + sorted((MODULE_DIR / f"{MODULE_FILE.stem}Lib").glob("*.py")) + sorted(
        path for folder in sorted(MODULE_DIR.glob("SegmentEditor*Lib")) for path in folder.glob("*.py"))


def ui_files() -> list[Path]:
    return sorted((MODULE_DIR / "Resources" / "UI").glob("*.ui"))


def ui_widgets() -> tuple[dict[str, str], str | None]:
    """objectName -> class of every widget, layout and action in the module's .ui files, and the top
    widget's class."""
    widgets, root_class = {}, None
    for path in ui_files():
        root = ET.parse(path).getroot()
        top = root.find("widget")
        if top is not None and root_class is None:
            root_class = top.get("class")
        for element in root.iter():
            if element.tag in ("widget", "layout", "action") and element.get("name"):
                widgets[element.get("name")] = element.get("class", "QAction")
    return widgets, root_class


def rel(path: Path) -> str:
    return path.relative_to(MODULE_DIR).as_posix() if path.is_relative_to(MODULE_DIR) else path.name


@dataclass(frozen=True)
class Use:
    where: str  # file:line
    what: str  # e.g. vtkSegment.SetTerminology


# Kinds of values the checker follows: tuples whose first item says what it is
#   ("mod", "slicer.util")  ("cls", "vtkMRMLScene"): exactly that class (constructed, slicer.mrmlScene, a .ui widget)
#   ("sub", "vtkMRMLNode"): that class or a subclass (a method's declared result, an annotation)
#   ("qt",)  ("py", module, class): an instance of Slicer's Python class  ("pycls", module, class): the class
#   ("own", class)
#   ("pnw", class)  ("ui",)  ("smodules",)  ("pyfunc", module, name)
#   ("bound", result kind[, signature, label, first parameter bound]): a method
#   ("super", class)  ("union", (kinds...))  ("foreign",)  None: not known
QT = ("qt",)
FOREIGN = ("foreign",)


@dataclass
class OwnClass:
    name: str
    node: ast.ClassDef
    bases: list
    methods: set = field(default_factory=set)
    attributes: set = field(default_factory=set)  # set on self anywhere, or class level
    fields: dict = field(default_factory=dict)  # annotations (parameter node wrapper fields)
    parameter_node_wrapper: bool = False


class Checker:
    """Walks one module file and records the Slicer API uses that ``api`` lacks."""

    def __init__(self, api: Api, path: Path, source: str | None = None):
        self.api, self.path = api, path
        self.source = path.read_text(encoding="utf-8") if source is None else source
        self.tree = ast.parse(self.source)
        self.missing: set[Use] = set()
        self.checked = 0
        self.resolved: set[str] = set()  # "Class.member" looked up in a known class
        self.widgets, self.ui_root = ui_widgets()
        self.module_name = MODULE_FILE.stem
        self.imports: dict[str, tuple] = {}
        self.module_functions: dict[str, tuple] = {}
        self.own: dict[str, OwnClass] = {}
        self.inferring: set = set()
        self.guards: list[set[str]] = []  # names tested by enclosing ``if hasattr(obj, "name"):``
        self.guarded_nodes = _try_guarded(self.tree)  # in try: ... except ImportError/AttributeError
        self._collect()

    # -- records ---------------------------------------------------------------------------------
    def _miss(self, node: ast.AST, what: str, record: bool) -> None:
        if record and id(node) not in self.guarded_nodes:
            self.missing.add(Use(f"{rel(self.path)}:{getattr(node, 'lineno', 0)}", what))

    # -- first pass: imports, own classes, helper functions ------------------------------------------
    def _collect(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    kind = ("mod", top) if top in SLICER_MODULES else FOREIGN
                    if alias.asname and top in ("slicer", "vtk"):
                        kind = self._module_path(alias.name, node, record=True)
                    self.imports[alias.asname or top] = kind
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                top = module.split(".")[0]
                for alias in node.names:
                    if node.level or top not in SLICER_MODULES:
                        self.imports[alias.asname or alias.name] = FOREIGN
                        continue
                    base = self._module_path(module, node, record=True)
                    self.imports[alias.asname or alias.name] = self.attribute(base, alias.name, node, record=True)
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef):
                # def _slicer(): import slicer; return slicer  -> calling it gives the slicer module
                returned = [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
                if len(returned) == 1 and isinstance(returned[0], ast.Name) and returned[0].id in ("slicer", "vtk"):
                    self.module_functions[node.name] = ("mod", returned[0].id)
            if isinstance(node, ast.ClassDef):
                own = OwnClass(node.name, node, [])
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        own.methods.add(item.name)
                    elif isinstance(item, ast.Assign):
                        own.attributes.update(t.id for t in item.targets if isinstance(t, ast.Name))
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        own.fields[item.target.id] = item.annotation
                for sub in ast.walk(node):
                    targets = sub.targets if isinstance(sub, ast.Assign) else \
                        [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else []
                    for target in targets:
                        for t in target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]:
                            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                                own.attributes.add(t.attr)
                own.parameter_node_wrapper = any(
                    self.imports.get(getattr(d, "id", ""), None) == ("pyfunc", "slicer.parameterNodeWrapper",
                                                                     "parameterNodeWrapper")
                    for d in node.decorator_list)
                self.own[node.name] = own
        for own in self.own.values():
            own.bases = [self.expr(b, {}, record=True) for b in own.node.bases]

    def _module_path(self, dotted: str, node: ast.AST, record: bool) -> tuple:
        parts = dotted.split(".")
        kind: tuple = ("mod", parts[0])
        for part in parts[1:]:
            kind = self.attribute(kind, part, node, record)
        return kind

    # -- attribute resolution ----------------------------------------------------------------------
    def attribute(self, kind, name: str, node: ast.AST, record: bool, store: bool = False):
        api = self.api
        if record and any(name in guard for guard in self.guards):
            record = False  # version-dependent code the module guards itself
        if kind is None:
            if name[:1].isupper():  # VTK/MRML style on an object of unknown class
                self.checked += record
                if name not in api.all_names:
                    self._miss(node, f"{name} (in no Slicer/VTK class)", record)
                returned = api.global_returns.get(name)
                return ("bound", ("sub", returned)) if returned in api.classes else None
            return None
        tag = kind[0]
        if tag in ("foreign", "qt"):
            return kind
        if tag == "union":
            results = {self.attribute(k, name, node, record, store) for k in kind[1]}
            return results.pop() if len(results) == 1 else None
        self.checked += record
        if tag == "mod":
            return self._module_attribute(kind[1], name, node, record)
        if tag in ("cls", "sub"):
            return self._class_attribute(kind[1], name, node, record, subclasses=tag == "sub")
        if tag in ("py", "pycls"):
            return self._python_class_attribute(kind[1], kind[2], name, node, record, bound=tag == "py")
        if tag in ("own", "super"):
            return self._own_attribute(kind[1], name, node, record, store, skip_own=tag == "super")
        if tag == "pnw":
            own = self.own[kind[1]]
            if name in own.fields:
                return self.annotation(own.fields[name])
            if name in own.methods or name in own.attributes:
                return None
            if name not in api.python["slicer.parameterNodeWrapper"].get("instance_api", ()):
                self._miss(node, f"parameterNodeWrapper instance .{name}", record)
            return ("bound", None)
        if tag == "ui":
            cls = self.widgets.get(name)
            if cls is None:  # childWidgetVariables() names the .ui's objects; this one is not there
                self._miss(node, f"ui.{name} (no object of that name in {', '.join(rel(p) for p in ui_files())})",
                           record)
                return None
            return ("cls", cls) if cls in api.classes else QT if cls.startswith("Q") else None
        if tag == "smodules":
            return self._slicer_modules_attribute(name, node, record)
        if tag in ("bound", "pyfunc"):
            return None
        return None

    def _module_attribute(self, module: str, name: str, node, record: bool):
        api = self.api
        if module == "slicer":
            python = api.python["slicer"]
            if name == "app":
                return ("cls", "qSlicerApplication")
            if name == "mrmlScene":
                return ("cls", "vtkMRMLScene")
            if name == "modules":
                return ("smodules",)
            if name in python["runtime"]:
                return None
            if name in python["submodules"]:
                return ("mod", f"slicer.{name}")
            if name in api.classes and api.origin(name) == "Slicer":
                return ("cls", name)
            if name in python["names"]:
                return None
            self._miss(node, f"slicer.{name}", record)
            return None
        if module.startswith("slicer."):
            info = api.python.get(module)
            if info is None:
                self._miss(node, module, record)
                return None
            if name in info.get("classes", {}):
                return ("pycls", module, name)
            if name in info["names"]:
                return ("pyfunc", module, name)
            if f"{module}.{name}" in api.python:
                return ("mod", f"{module}.{name}")
            self._miss(node, f"{module}.{name}", record)
            return None
        if module == "vtk":
            if name in api.classes and api.origin(name) == "VTK":
                return ("cls", name)
            if name == "util":
                return ("mod", "vtk.util")
            if name in api.vtk_python["constants"] or name in api.vtk_python["names"]:
                return None
            self._miss(node, f"vtk.{name} (not in the VTK kits listed: {', '.join(api.data['vtk']['dirs'])})", record)
            return None
        if module == "vtk.util":
            if name in api.vtk_python["util"]:
                return ("mod", f"vtk.util.{name}")
            self._miss(node, f"vtk.util.{name}", record)
            return None
        if module.startswith("vtk.util."):
            if name not in api.vtk_python["util"].get(module.rsplit(".", 1)[1], ()):
                self._miss(node, f"{module}.{name}", record)
            return None
        if module == "ctk":
            if name in api.classes and api.origin(name) == "CTK":
                return ("cls", name)
            self._miss(node, f"ctk.{name}", record)
            return None
        if module == "qt":
            if not api.has_qt:
                return QT
            if name in api.classes and api.origin(name) == "Qt":
                return ("cls", name)
            if name in api.data["qt"].get("other_classes", ()):
                return QT  # a Qt class listed by name only (QColor, QTableWidgetItem ...): not checked further
            self._miss(node, f"qt.{name} (not a Qt {api.data['qt']['version']} class)", record)
            return None
        return None

    def _class_attribute(self, cls: str, name: str, node, record: bool, subclasses: bool):
        api = self.api
        if record:
            self.resolved.add(f"{cls}.{name}")
        owner, found = cls, api.lookup(cls, name)
        if found == "missing" and subclasses:  # a vtkMRMLNode that AddNewNodeByClass made can be any node
            owner = next((c for c in api.subclasses(cls) if api.lookup(c, name) == "found"), None)
            found = "found" if owner else "missing"
        if found in ("missing", "unknown") and name in PYTHONQT_QOBJECT_EXTRAS and api.derives(cls, "QObject"):
            return ("bound", None)
        if found == "missing" or (found == "unknown" and name not in api.all_names):
            self._miss(node, f"{cls}.{name}", record)
            return ("bound", None)
        if found == "qt":
            return ("bound", QT)
        returned = api.returns(owner, name)
        if returned in api.classes:
            return ("bound", ("sub", returned))
        return ("bound", QT if returned and returned.startswith("Q") else None)

    def _python_class_entry(self, module: str, cls: str) -> dict | None:
        if module.startswith("scripted:"):
            return self.api.modules[module.split(":", 1)[1]].get("classes", {}).get(cls)
        return self.api.python.get(module, {}).get("classes", {}).get(cls)

    def _python_class_attribute(self, module: str, cls: str, name: str, node, record: bool, report: bool = True,
                                bound: bool = True):
        """Attribute of one of Slicer's Python classes (its bases followed by name); None when not found."""
        entry = self._python_class_entry(module, cls)
        if entry is None:
            if report:
                self._miss(node, f"{module}.{cls}", record)
            return None
        if name in entry["methods"]:
            signature = entry.get("signatures", {}).get(name)
            return ("bound", None, tuple(signature) if signature else None, f"{cls}.{name}", bound)
        if name in entry["attributes"]:
            typed = SLICER_PYTHON_ATTRIBUTE_TYPES.get((cls, name)) or entry.get("attribute_types", {}).get(name)
            if typed in self.api.classes:
                return ("sub", typed)
            return QT if typed and typed.startswith("Q") else ("bound", None)
        for base in entry["bases"]:
            if base in ("unittest.TestCase",):
                if hasattr(unittest.TestCase, name):
                    return ("bound", None)
                continue
            base_kind = self._python_base(module, base)
            if base_kind is not None:
                found = self._python_class_attribute(base_kind[0], base_kind[1], name, node, record, report=False,
                                                     bound=bound)
                if found is not None:
                    return found
        if report:
            self._miss(node, f"{cls}.{name} ({module})", record)
        return None

    def _python_base(self, module: str, base: str) -> tuple | None:
        """Where a Slicer Python class's base is defined: ScriptedLoadableModuleWidget, VTKObservationMixin..."""
        name = base.rsplit(".", 1)[-1]
        for candidate in (module, "slicer.ScriptedLoadableModule", "slicer.util"):
            if self._python_class_entry(candidate, name) is not None:
                return candidate, name
        return None

    def _own_attribute(self, cls: str, name: str, node, record: bool, store: bool, skip_own: bool = False):
        own = self.own[cls]
        if not skip_own:
            if name in own.methods:
                return ("bound", self._own_method_result(own, name))
            if name in own.attributes or name in own.fields:
                return self.self_attribute_kind(own, name)
            if store:
                return None
        unresolved = False
        for base in own.bases:
            if base is None or base[0] not in ("py", "pycls", "own"):
                unresolved = True
                continue
            if base[0] == "own":
                found = self._own_attribute(base[1], name, node, False, store)
                if found is not None or name in self.own[base[1]].attributes | self.own[base[1]].methods:
                    return found
                continue
            found = self._python_class_attribute(base[1], base[2], name, node, record, report=False)
            if found is not None:
                return found
        if own.bases and not unresolved:
            self._miss(node, f"{cls}.{name} (not defined by {cls} nor its Slicer bases "
                             f"{', '.join(ast.unparse(b) for b in own.node.bases)})", record)
        return None

    def _own_method_result(self, own: OwnClass, name: str):
        """What the module's own method returns, when every ``return`` says the same (getParameterNode)."""
        key = (own.name, name)
        if key in self.inferring:
            return None
        self.inferring.add(key)
        try:
            method = next(n for n in own.node.body if isinstance(n, ast.FunctionDef) and n.name == name)
            kinds = {self.expr(r.value, self._params(method, own), record=False)
                     for r in ast.walk(method) if isinstance(r, ast.Return) and r.value is not None}
            return kinds.pop() if len(kinds) == 1 else None
        finally:
            self.inferring.discard(key)

    def self_attribute_kind(self, own: OwnClass, name: str):
        """The kind of ``self.<name>``, from every assignment to it in the class (None assignments aside)."""
        key = (own.name, "self." + name)
        if key in self.inferring:
            return None
        self.inferring.add(key)
        try:
            kinds = set()
            for method in own.node.body:
                if not isinstance(method, ast.FunctionDef):
                    continue
                ctx = self._params(method, own)
                for sub in ast.walk(method):
                    if isinstance(sub, ast.Assign) and not (isinstance(sub.value, ast.Constant)
                                                            and sub.value.value is None):
                        for target in sub.targets:
                            if isinstance(target, ast.Attribute) and target.attr == name and \
                                    isinstance(target.value, ast.Name) and target.value.id == "self":
                                kinds.add(self.expr(sub.value, ctx, record=False))
            if name in own.fields:
                kinds.add(self.annotation(own.fields[name]))
            return kinds.pop() if len(kinds) == 1 else None
        finally:
            self.inferring.discard(key)

    def _slicer_modules_attribute(self, name: str, node, record: bool):
        api = self.api
        if name.startswith(self.module_name) and name != self.module_name:
            return ("own", name) if name in self.own else None  # this module's own MedicalSAM3Widget ...
        if name.lower() == self.module_name.lower():
            return ("sub", "qSlicerAbstractModule")
        for suffix in ("Widget", "Logic", "Instance"):
            module = name[:-len(suffix)] if name.endswith(suffix) else None
            if module and module in api.modules:
                cls = name if suffix != "Instance" else module
                if cls in api.modules[module].get("classes", {}):
                    return ("py", f"scripted:{module}", cls)
                self._miss(node, f"slicer.modules.{name}", record)
                return None
        if name in api.module_names:
            return ("sub", "qSlicerAbstractModule")
        self._miss(node, f"slicer.modules.{name}", record)
        return None

    def annotation(self, node: ast.AST):
        """``vtkMRMLScalarVolumeNode``, ``Optional[X]``, ``Annotated[X, ...]`` -> the kind of X."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(node, ast.Subscript):
            head = getattr(node.value, "id", getattr(node.value, "attr", ""))
            inner = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
            return self.annotation(inner) if head in ("Optional", "Annotated") else None
        if isinstance(node, ast.BinOp):  # X | None
            return self.annotation(node.left)
        if isinstance(node, ast.Name):
            if node.id in self.own:
                return ("pnw", node.id) if self.own[node.id].parameter_node_wrapper else ("own", node.id)
            kind = self.imports.get(node.id)
            return ("sub", kind[1]) if kind and kind[0] == "cls" else None
        return None

    def _params(self, function: ast.FunctionDef, own: OwnClass | None) -> dict:
        ctx = {}
        args = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
        for k, arg in enumerate(args):
            if k == 0 and own is not None and not any(getattr(d, "id", "") == "staticmethod"
                                                      for d in function.decorator_list):
                ctx[arg.arg] = ("pnw", own.name) if own.parameter_node_wrapper else ("own", own.name)
            elif arg.annotation is not None:
                ctx[arg.arg] = self.annotation(arg.annotation)
            else:
                ctx[arg.arg] = None
        return ctx

    # -- expressions -------------------------------------------------------------------------------
    def expr(self, node: ast.AST, ctx: dict, record: bool = True):
        if isinstance(node, ast.Name):
            if node.id in ctx:
                return ctx[node.id]
            if node.id in self.own:
                return ("own", node.id)
            if node.id in self.imports:
                return self.imports[node.id]
            if node.id in self.module_functions:
                return ("modfunc", node.id)
            return None
        if isinstance(node, ast.Attribute):
            base = self.expr(node.value, ctx, record)
            store = isinstance(node.ctx, ast.Store)
            result = self.attribute(base, node.attr, node, record, store)
            return result
        if isinstance(node, ast.Call):
            func = self.expr(node.func, ctx, record)
            for arg in node.args:
                self.expr(arg, ctx, record)
            for keyword in node.keywords:
                self.expr(keyword.value, ctx, record)
            self._check_connect(node, ctx, record)
            self._check_arguments(func, node, record)
            return self._call_result(func, node, ctx)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            kinds = tuple(self.expr(e, ctx, record) for e in node.elts)
            return ("union", tuple(dict.fromkeys(kinds))) if kinds and all(k is not None for k in kinds) else None
        if isinstance(node, ast.Lambda):
            inner = dict(ctx)
            for arg in node.args.args:
                inner[arg.arg] = None
            self.expr(node.body, inner, record)
            return None
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(ctx)
            for generator in node.generators:
                self.expr(generator.iter, inner, record)
                for name in ast.walk(generator.target):
                    if isinstance(name, ast.Name):
                        inner[name.id] = None
                for condition in generator.ifs:
                    self.expr(condition, inner, record)
            for part in ("elt", "key", "value"):
                if hasattr(node, part):
                    self.expr(getattr(node, part), inner, record)
            return None
        if isinstance(node, ast.IfExp):
            self.expr(node.test, ctx, record)
            kinds = {self.expr(node.body, ctx, record), self.expr(node.orelse, ctx, record)}
            kinds.discard(None)
            return kinds.pop() if len(kinds) == 1 else None
        if isinstance(node, ast.BoolOp):
            kinds = {self.expr(v, ctx, record) for v in node.values}
            return kinds.pop() if len(kinds) == 1 else None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, ctx, record)
        return None

    def _call_result(self, func, node: ast.Call, ctx: dict):
        if func is None:
            if isinstance(node.func, ast.Name) and node.func.id == "super" and ctx.get("__class__"):
                return ("super", ctx["__class__"])
            return None
        tag = func[0]
        if tag == "bound":
            return func[1]
        if tag in ("cls", "sub", "qt", "foreign"):
            return ("cls", func[1]) if tag == "sub" else func
        if tag == "pycls":
            return ("py",) + func[1:]
        if tag == "py":
            return func
        if tag == "own":
            own = self.own[func[1]]
            return ("pnw", own.name) if own.parameter_node_wrapper else func
        if tag == "modfunc":
            return self.module_functions[func[1]]
        if tag == "pyfunc":
            special = SLICER_PYTHON_RESULTS.get((func[1], func[2]))
            if special == "ui":
                return ("ui",)
            if special == "ui-root" and self.ui_root in self.api.classes:
                return ("cls", self.ui_root)
        return None

    def _signature_of(self, func) -> tuple | None:
        """(parameter names, label, whether the first parameter is bound) of a Slicer Python callable."""
        if func is None:
            return None
        if func[0] == "bound" and len(func) > 2 and func[2]:
            return func[2], func[3], func[4]
        if func[0] == "pyfunc":
            signature = self.api.python.get(func[1], {}).get("signatures", {}).get(func[2])
            return (tuple(signature), f"{func[1]}.{func[2]}", False) if signature else None
        if func[0] == "pycls":
            init = self._python_class_attribute(func[1], func[2], "__init__", None, False, report=False)
            if init and len(init) > 2 and init[2]:
                return init[2], f"{func[2]}()", True
        return None

    def _check_arguments(self, func, node: ast.Call, record: bool) -> None:
        """Keyword and positional arguments of calls to Slicer's Python functions and methods
        (``slicer.util.tryWithErrorDisplay(..., waitCursor=True)``)."""
        found = self._signature_of(func)
        if found is None:
            return
        signature, label, bound = found
        params = list(signature[1:] if bound and signature and not signature[0].startswith("*") else signature)
        positional, keyword_only, varargs, varkw, star = [], [], False, False, False
        for param in params:
            if param.startswith("**"):
                varkw = True
            elif param.startswith("*"):
                star, varargs = True, param != "*"
            else:
                (keyword_only if star else positional).append(param)
        if not varargs and not any(isinstance(a, ast.Starred) for a in node.args) and len(node.args) > len(positional):
            self._miss(node, f"{label}: {len(node.args)} positional arguments, takes {len(positional)}", record)
        for keyword in node.keywords:
            if keyword.arg and not varkw and keyword.arg not in positional + keyword_only:
                self._miss(node, f"{label}(..., {keyword.arg}=...)", record)

    def _check_connect(self, node: ast.Call, ctx: dict, record: bool) -> None:
        """``widget.connect("currentPathChanged(QString)", slot)``: the widget's class has that signal."""
        if not (isinstance(node.func, ast.Attribute) and node.func.attr == "connect" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return
        signal = node.args[0].value.split("(", 1)[0].strip()
        receiver = self.expr(node.func.value, ctx, record=False)
        kinds = receiver[1] if receiver and receiver[0] == "union" else (receiver,)
        for kind in kinds:
            if kind and kind[0] in ("cls", "sub"):
                candidates = [kind[1]] + (self.api.subclasses(kind[1]) if kind[0] == "sub" else [])
                if all(self.api.lookup(c, signal, ("signals",)) in ("missing", "unknown") for c in candidates):
                    self._miss(node, f"{kind[1]} signal {signal}", record)

    # -- statements --------------------------------------------------------------------------------
    def run(self) -> set[Use]:
        self.block(self.tree.body, {}, None)
        return self.missing

    def block(self, statements: list, ctx: dict, own: OwnClass | None) -> None:
        for statement in statements:
            self.statement(statement, ctx, own)

    def statement(self, node: ast.stmt, ctx: dict, own: OwnClass | None) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return  # checked in _collect
        if isinstance(node, ast.ClassDef):
            for decorator in node.decorator_list:
                self.expr(decorator, ctx)
            for item in node.body:
                self.statement(item, dict(ctx), self.own.get(node.name))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                self.expr(decorator, ctx)
            inner = dict(ctx)
            inner.update(self._params(node, own) if own is not None else
                         {a.arg: (self.annotation(a.annotation) if a.annotation is not None else None)
                          for a in node.args.args + node.args.kwonlyargs})
            if own is not None:
                inner["__class__"] = own.name
            self.block(node.body, inner, None)
            return
        if isinstance(node, ast.Assign):
            kind = self.expr(node.value, ctx)
            for target in node.targets:
                self._bind(target, kind, node.value, ctx)
            return
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            kind = self.expr(node.value, ctx) if node.value is not None else None
            self._bind(node.target, kind, node.value, ctx)
            return
        if isinstance(node, (ast.For, ast.AsyncFor)):
            iterable = self.expr(node.iter, ctx)
            element = iterable if iterable and iterable[0] == "union" else None
            if isinstance(element, tuple) and len(element[1]) == 1:
                element = element[1][0]
            self._bind(node.target, element, None, ctx)
            self.block(node.body, ctx, None)
            self.block(node.orelse, ctx, None)
            return
        if isinstance(node, ast.If):
            self.expr(node.test, ctx)
            self.guards.append(_guarded_names(node.test))
            try:
                self.block(node.body, ctx, None)
            finally:
                self.guards.pop()
            self.block(node.orelse, ctx, None)
            return
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.expr(item.context_expr, ctx)
                if item.optional_vars is not None:
                    self._bind(item.optional_vars, None, None, ctx)
            self.block(node.body, ctx, None)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.statement(child, ctx, None)
            elif isinstance(child, ast.expr):
                self.expr(child, ctx)
            elif isinstance(child, ast.ExceptHandler):
                if child.type is not None:
                    self.expr(child.type, ctx)
                if child.name:
                    ctx[child.name] = None
                self.block(child.body, ctx, None)

    def _bind(self, target: ast.AST, kind, value, ctx: dict) -> None:
        if isinstance(target, ast.Name):
            ctx[target.id] = kind
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and \
                len(value.elts) == len(target.elts) else [None] * len(target.elts)
            for t, v in zip(target.elts, values):
                self._bind(t, self.expr(v, ctx, record=False) if v is not None else None, v, ctx)
        elif isinstance(target, ast.Attribute):
            self.expr(target, ctx)  # store: the attribute must exist on known classes (properties)
        elif isinstance(target, ast.Subscript):
            self.expr(target.value, ctx)
            self.expr(target.slice, ctx)


def _try_guarded(tree: ast.AST) -> set[int]:
    """ids of the imports in ``try:`` blocks that catch ImportError (``import slicer.packaging`` on 5.10),
    and of the attributes in those that catch AttributeError: version-dependent code guarded by the module."""
    guarded = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {getattr(t, "id", getattr(t, "attr", "")) for t in types if t is not None}
        for statement in node.body:
            for sub in ast.walk(statement):
                if caught & {"ImportError", "ModuleNotFoundError"} and isinstance(sub, (ast.Import, ast.ImportFrom)):
                    guarded.add(id(sub))
                if "AttributeError" in caught and isinstance(sub, ast.Attribute):
                    guarded.add(id(sub))
    return guarded


def _guarded_names(test: ast.expr) -> set[str]:
    """``hasattr(obj, "name")`` / ``getattr(obj, "name", None)`` in an ``if`` test, not under ``not``."""
    negated = {id(n) for u in ast.walk(test) if isinstance(u, ast.UnaryOp) and isinstance(u.op, ast.Not)
               for n in ast.walk(u.operand)}
    return {n.args[1].value for n in ast.walk(test)
            if isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("hasattr", "getattr") and len(n.args) >= 2
            and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str) and id(n) not in negated}


def check_ui(api: Api, paths: list[Path] | None = None) -> set[Use]:
    """Custom widget classes, their <property> names, enum values and <connection> signals/slots."""
    missing = set()
    for path in paths or ui_files():
        root = ET.parse(path).getroot()
        classes = {w.get("name"): w.get("class") for w in root.iter("widget")}
        lines = path.read_text(encoding="utf-8").splitlines()

        def line_of(text: str, start: int = 0) -> int:
            for k in range(start, len(lines)):
                if text in lines[k]:
                    return k + 1
            return 0

        def miss(text: str, what: str, after: int = 0):
            missing.add(Use(f"{rel(path)}:{line_of(text, after)}", what))

        for custom in root.iter("customwidget"):
            cls = custom.findtext("class")
            if cls and cls not in api.classes:
                miss(f"<class>{cls}</class>", f"custom widget class {cls}")
        for widget in root.iter("widget"):
            cls, name = widget.get("class"), widget.get("name")
            if cls not in api.classes:
                continue
            start = line_of(f'name="{name}"') - 1
            for prop in widget.findall("property"):
                if prop.get("stdset") == "0":
                    continue  # a dynamic property (SlicerParameterName), not the class's
                pname = prop.get("name")
                if api.lookup(cls, pname, ("properties",)) in ("missing", "unknown"):
                    miss(f'<property name="{pname}"', f"{cls} property {pname}", start)
                for value_node in list(prop.iter("set")) + list(prop.iter("enum")):
                    for value in re.split(r"\s*\|\s*", value_node.text or ""):
                        owner, _, enum = value.partition("::")
                        if enum and owner in api.classes and api.lookup(owner, enum, ("constants",)) != "found":
                            miss(value, f"{owner}::{enum} (in {cls} property {pname})", start)
        for connection in root.iter("connection"):
            for role, member in (("sender", "signal"), ("receiver", "slot")):
                cls = classes.get(connection.findtext(role))
                text = connection.findtext(member) or ""
                name = text.split("(", 1)[0]
                kinds = ("signals",) if member == "signal" else ("slots",)
                if cls in api.classes and api.lookup(cls, name, kinds) in ("missing", "unknown"):
                    miss(f"<{member}>{text}</{member}>", f"{cls} {member} {name}")
    return missing


def missing_uses(version: str, files: list[Path] | None = None, source: str | None = None) -> set[Use]:
    api = load_api(version)
    if source is not None:
        return Checker(api, MODULE_DIR / "synthetic.py", source).run()
    missing = set()
    for path in files or module_sources():
        missing |= Checker(api, path).run()
    if files is None:
        missing |= check_ui(api)
    return missing


def report(missing_by_version: dict[str, set[Use]]) -> str:
    versions_of: dict[Use, list[str]] = {}
    for version, uses in missing_by_version.items():
        for use in uses:
            versions_of.setdefault(use, []).append(version)
    lines = []
    for use in sorted(versions_of, key=lambda u: (u.where.split(":")[0], int(u.where.rsplit(":", 1)[1]), u.what)):
        versions = versions_of[use]
        commits = ", ".join(f"{v} @ {load_api(v).commit[:10]}" for v in versions)
        lines.append(f"  {use.where}: {use.what} -- not in Slicer {', '.join(versions)} ({commits})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- tests
def test_lists_exist_for_every_supported_version():
    for version in SUPPORTED + (UNSUPPORTED_LISTED,):
        path = DATA / f"slicer_api_{version}.json"
        assert path.is_file(), f"{path} is missing: run Testing/tools/dump_slicer_api.py (see its docstring)"
        api = load_api(version)
        assert api.data["slicer"]["branch"] == version
        assert re.fullmatch(r"[0-9a-f]{40}", api.commit)
        assert api.commit in api.data["generated_by"]


def test_module_uses_only_api_of_every_supported_slicer():
    missing = {version: missing_uses(version) for version in SUPPORTED}
    assert not any(missing.values()), (
        "the module uses Slicer API that a supported Slicer version lacks (lists: Testing/data/slicer_api_*.json, "
        "made by Testing/tools/dump_slicer_api.py from Slicer's source):\n" + report(missing))


def test_checker_follows_the_module():
    """Guard against a checker that silently checks nothing: most uses are looked up in a known class."""
    api = load_api(SUPPORTED[-1])
    resolved, checked = set(), 0
    for path in module_sources():
        checker = Checker(api, path)
        checker.run()
        resolved |= checker.resolved
        checked += checker.checked
    assert checked > 200 and len(resolved) > 50, (checked, sorted(resolved))
    assert any(r.startswith(("vtkMRML", "vtkSegment")) for r in resolved), sorted(resolved)  # MRML objects
    assert any(r.startswith(("ctk", "qMRML", "qSlicer")) for r in resolved), sorted(resolved)  # widgets
    widgets, root = ui_widgets()
    assert root in api.classes and all(cls in api.classes or cls in api.data["qt"]["other_classes"]
                                       for cls in widgets.values()), widgets


def test_guard_catches_set_terminology_on_5_8():
    """vtkSegment.SetTerminology/GetTerminology came in Slicer 5.10; 5.8 had only tags: every call of it
    in the module (scene.py) is reported against the 5.8 list, at its line."""
    calls = {f"{rel(path)}:{number}" for path in module_sources()
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if ".SetTerminology(" in line}
    if not calls:
        pytest.skip("the module no longer calls SetTerminology")
    missing = missing_uses(UNSUPPORTED_LISTED)
    reported = {use.where for use in missing if "SetTerminology" in use.what}
    assert calls <= reported, (sorted(calls - reported), report({UNSUPPORTED_LISTED: missing}))


SYNTHETIC_5_13 = '''
import slicer

def f(volumeNode):
    scene = slicer.mrmlScene
    displayNode = volumeNode.GetDisplayNode()
    displayNode.SetShowInAllViewsByDefault(True)     # vtkMRMLDisplayNode, new after 5.12
    lazy = slicer.util.LazyImport("numpy")           # slicer.util, new after 5.12
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()                 # old: fine everywhere
'''


def test_guard_catches_api_newer_than_5_12():
    """Two real slicer-core (5.13) additions, checked against the 5.12 list (and known to slicer-core)."""
    slicer = pytest.importorskip("slicer")
    assert hasattr(slicer.vtkMRMLDisplayNode, "SetShowInAllViewsByDefault")
    assert hasattr(slicer.util, "LazyImport")
    missing = {use.what for use in missing_uses("5.12", source=SYNTHETIC_5_13)}
    assert any("SetShowInAllViewsByDefault" in m for m in missing), missing
    assert "slicer.util.LazyImport" in missing, missing
    assert not any("CreateDefaultDisplayNodes" in m or "AddNewNodeByClass" in m for m in missing), missing


def test_guard_follows_classes_and_widgets():
    """Known classes are checked precisely: a method of another class is not enough."""
    source = '''
import slicer, vtk
def f():
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(vtk.vtkMatrix4x4())
    image.GetSegmentation()                       # a vtkMRMLSegmentationNode method, not vtkOrientedImageData's
    slicer.mrmlScene.StartCloseEvent
    slicer.mrmlScene.NoSuchEvent
    slicer.app.processEvents()                    # Qt (QApplication): allowed
    slicer.modules.SegmentEditorWidget.editor.setSourceVolumeNode(None)
    slicer.modules.SegmentEditorWidget.editor.setNoSuchNode(None)
'''
    missing = {use.what for use in missing_uses("5.12", source=source)}
    assert missing == {"vtkOrientedImageData.GetSegmentation", "vtkMRMLScene.NoSuchEvent",
                       "qMRMLSegmentEditorWidget.setNoSuchNode"}, missing


def test_guard_checks_widgets_and_arguments():
    """The panel's widgets by their .ui class; signals; Slicer's Python functions' parameters."""
    widgets, _ = ui_widgets()
    path_edit = next(name for name, cls in widgets.items() if cls == "ctkPathLineEdit")
    source = f'''
import slicer
def f(w):
    ui = slicer.util.childWidgetVariables(w)
    ui.{path_edit}.currentPath = "x"
    ui.{path_edit}.noSuchProperty = "x"
    ui.{path_edit}.connect("currentPathChanged(QString)", print)
    ui.{path_edit}.connect("noSuchSignal(QString)", print)
    slicer.util.tryWithErrorDisplay("failed", waitCursor=True)
    slicer.util.tryWithErrorDisplay("failed", noSuchArgument=True)
'''
    missing = {use.what for use in missing_uses("5.12", source=source)}
    assert missing == {"ctkPathLineEdit.noSuchProperty", "ctkPathLineEdit signal noSuchSignal",
                       "slicer.util.tryWithErrorDisplay(..., noSuchArgument=...)"}, missing


def test_guard_checks_ui_files(tmp_path):
    ui = tmp_path / "bad.ui"
    ui.write_text('''<?xml version="1.0" encoding="UTF-8"?>
<ui version="4.0"><class>Bad</class>
 <widget class="qMRMLWidget" name="Bad">
  <widget class="ctkCollapsibleButton" name="button">
   <property name="collapsed"><bool>true</bool></property>
   <property name="collapsedX"><bool>true</bool></property>
   <property name="SlicerParameterName" stdset="0"><string>x</string></property>
  </widget>
  <widget class="ctkPathLineEdit" name="path">
   <property name="filters"><set>ctkPathLineEdit::Dirs|ctkPathLineEdit::NoSuchFilter</set></property>
  </widget>
  <widget class="QLineEdit" name="line">
   <property name="echoMode"><enum>QLineEdit::Password</enum></property>
   <property name="placeholderTextX"><string>x</string></property>
  </widget>
 </widget>
 <customwidgets><customwidget><class>ctkNoSuchWidget</class></customwidget></customwidgets>
 <connections><connection><sender>Bad</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal>
  <receiver>path</receiver><slot>setMRMLScene(vtkMRMLScene*)</slot></connection></connections>
</ui>
''', encoding="utf-8")
    missing = {use.what for use in check_ui(load_api("5.12"), [ui])}
    assert missing == {"ctkCollapsibleButton property collapsedX", "custom widget class ctkNoSuchWidget",
                       "ctkPathLineEdit::NoSuchFilter (in ctkPathLineEdit property filters)",
                       "QLineEdit property placeholderTextX", "ctkPathLineEdit slot setMRMLScene"}, missing


def test_guard_accepts_code_the_module_guards_itself():
    """``if hasattr(slicer, "packaging"):``, ``try: import ... except ImportError`` mark version-dependent
    code: not reported where absent."""
    guarded = '''
import slicer
def f():
    if hasattr(slicer, "packaging"):
        slicer.packaging.pip_install(["numpy"])
'''
    assert not missing_uses("5.10", source=guarded)
    assert not missing_uses("5.12", source=guarded)
    unguarded = guarded.replace('if hasattr(slicer, "packaging")', "if True")
    assert {use.what for use in missing_uses("5.10", source=unguarded)} == {"slicer.packaging"}
    assert not missing_uses("5.12", source=unguarded)
    imported = '''
try:
    import slicer.packaging as packaging  # Slicer >= 5.12
except ModuleNotFoundError:
    packaging = None
'''
    assert not missing_uses("5.10", source=imported)
    assert {use.what for use in missing_uses("5.10", source=imported.replace("ModuleNotFoundError", "KeyError"))} \
        == {"slicer.packaging"}


# Where the sources of the lists are (git mirrors, Qt 5.15 headers); CI has none of them.
SOURCES = {
    "slicer": os.environ.get("SLICER_GIT_DIR", "/work/.mirror/Slicer+Slicer/repo"),
    "ctk": os.environ.get("CTK_GIT_DIR", "/work/.mirror/commontk+CTK/repo"),
    "vtk": os.environ.get("VTK_GIT_DIR", "/work/.mirror/Kitware+VTK/repo"),
    "qt": os.environ.get("QT_INCLUDE_DIR", "/usr/include/x86_64-linux-gnu/qt5"),
}


def _qt_version(include: str) -> str | None:
    config = Path(include) / "QtCore" / "qconfig.h"
    match = re.search(r'#define QT_VERSION_STR "([\d.]+)"', config.read_text()) if config.is_file() else None
    return match.group(1) if match else None


@pytest.mark.parametrize("version", SUPPORTED + (UNSUPPORTED_LISTED,))
def test_recorded_commit_is_on_its_branch(version):
    committed = load_api(version).data["slicer"]
    if not Path(SOURCES["slicer"]).is_dir() or shutil.which("git") is None:
        pytest.skip(f"no Slicer git mirror (SLICER_GIT_DIR={SOURCES['slicer']}): cannot check commit "
                    f"{committed['commit']} of branch {version}")
    on_branch = subprocess.run(["git", "--git-dir", SOURCES["slicer"], "merge-base", "--is-ancestor",
                                committed["commit"], version], capture_output=True).returncode == 0
    assert on_branch, f"Testing/data/slicer_api_{version}.json: {committed['commit']} is not on Slicer's {version}"


def _without_qt(data: dict) -> dict:
    data = dict(data, classes={n: e for n, e in data["classes"].items() if not e["file"].startswith("Qt:")})
    return {k: v for k, v in data.items() if k not in ("qt", "generated_by")}


@pytest.mark.parametrize("version", SUPPORTED + (UNSUPPORTED_LISTED,))
def test_committed_list_is_what_the_script_writes(version, tmp_path):
    """Byte for byte with all sources; without Qt 5.15's headers, all but the Qt classes."""
    committed = load_api(version).data
    absent = [f"{name} ({path})" for name, path in SOURCES.items() if name != "qt" and not Path(path).is_dir()]
    if absent or shutil.which("git") is None:
        pytest.skip("regenerating the list needs git mirrors of Slicer, CTK and VTK (SLICER_GIT_DIR, CTK_GIT_DIR, "
                    f"VTK_GIT_DIR); absent: {', '.join(absent) or 'git'}")
    qt = committed.get("qt")
    with_qt = bool(qt) and _qt_version(SOURCES["qt"]) == qt["version"]
    output = tmp_path / "api.json"
    command = [sys.executable, str(TOOL), SOURCES["slicer"], version, str(output), "--commit",
               committed["slicer"]["commit"], "--ctk-git", SOURCES["ctk"], "--vtk-git", SOURCES["vtk"]]
    if with_qt:
        command += ["--qt-include", SOURCES["qt"], "--qt-source", qt["source"]]
    subprocess.run(command, check=True, capture_output=True)
    stale = f"Testing/data/slicer_api_{version}.json is not what Testing/tools/dump_slicer_api.py writes: rerun it"
    if with_qt or not qt:
        assert output.read_text(encoding="utf-8") == (DATA / f"slicer_api_{version}.json").read_text(
            encoding="utf-8"), stale
    else:  # no Qt headers here (QT_INCLUDE_DIR): compare the rest
        assert _without_qt(json.loads(output.read_text(encoding="utf-8"))) == _without_qt(committed), stale


def test_checker_follows_the_segment_editor_effect():
    """The effect's calls are looked up in their classes: the adaptor Slicer gives the effect
    (``self.scriptedEffect``), the interactor of mouse events, the editor's parameter node."""
    effects = [path for path in module_sources() if path.parent.name.startswith("SegmentEditor")]
    assert effects, "no Segment Editor effect found next to the module"
    api = load_api(SUPPORTED[-1])
    resolved = set()
    for path in effects:
        checker = Checker(api, path)
        checker.run()
        resolved |= checker.resolved
    for use in ("qSlicerSegmentEditorScriptedEffect.saveStateForUndo",
                "qSlicerSegmentEditorScriptedEffect.modifySegmentByLabelmap",
                "qSlicerSegmentEditorScriptedEffect.xyToRas", "vtkRenderWindowInteractor.GetEventPosition",
                "vtkMRMLSegmentEditorNode.GetSelectedSegmentID"):
        assert use in resolved, (use, sorted(resolved))
    effect = next(path for path in effects if path.name == "SegmentEditorEffect.py")
    source = effect.read_text(encoding="utf-8").replace("self.scriptedEffect.saveStateForUndo()",
                                                             "self.scriptedEffect.saveStateForUndoo()")
    missing = {use.what for use in Checker(api, effect, source).run()}
    assert "qSlicerSegmentEditorScriptedEffect.saveStateForUndoo" in missing, missing
