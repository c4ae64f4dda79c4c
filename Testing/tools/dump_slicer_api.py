"""Write the list of 3D Slicer's API that the module may rely on, for one Slicer release branch
(Testing/data/slicer_api_<branch>.json), read from Slicer's source in a git mirror.

``Testing/slicer/test_slicer_api.py`` checks every Slicer, MRML, VTK, CTK and Qt name the module uses
against these lists, one per supported Slicer version (the module is developed against the PyPI
``slicer-core`` package, which is newer than the Slicer that users run).

What is listed (header files are read with a small C++ reader, not compiled):

* C++ classes (``classes``): Slicer's MRML, MRML logic and widgets, segmentation core, vtkITK,
  application logic, Base/QTCore and Base/QTGUI, the Logic/MRML/Widgets/EditorEffects of every
  loadable module; VTK's Common, Imaging/Core and Rendering/Core kits at the commit Slicer's
  ``SuperBuild/External_VTK.cmake`` pins; CTK's Core, Widgets and VTK widgets at the commit
  ``SuperBuild/External_CTK.cmake`` pins; Qt 5.15's QObject classes (QtCore, QtGui, QtWidgets), the Qt
  bases of the classes above and the ``Qt`` namespace's enums, from Qt's headers. For each class: its
  bases, public methods (VTK's macros expanded: ``vtkGetMacro(X, t)`` -> ``GetX``, ``vtkBooleanMacro``
  -> ``XOn``/``XOff`` ...), public enum values and static constants, and for Qt classes the
  ``Q_PROPERTY`` names, signals and public slots. Methods that return a known class pointer are
  listed in ``returns`` (to follow ``node.GetSegmentation().GetSegment(...)``). Code in
  ``#ifndef __VTK_WRAP__`` or marked ``VTK_WRAPEXCLUDE``/``VTK_LEGACY`` is left out (Python cannot
  reach it); of the other ``#if``/``#else`` branches only the first is read.
* Slicer's Python package (``python``), parsed with ``ast``: per module of ``Base/Python/slicer``
  its public names and functions' parameters, classes (bases, methods with parameters, attributes
  set on ``self``), the instance API that ``@parameterNodeWrapper`` adds; the attributes Slicer sets
  at start-up (``slicer.app`` ...).
* Slicer's modules (``modules``): the loadable, scripted and CLI module names (``slicer.modules.x``)
  and the classes of each scripted module (``slicer.modules.SegmentEditorWidget.editor``).
* VTK's Python extras (``vtk_python``): type constants (``VTK_UNSIGNED_CHAR``), the helper types of
  ``vtkCommonCore`` (``reference``) and the functions of ``vtkmodules.util.numpy_support``.

The sources: git mirrors of Slicer/Slicer, commontk/CTK and Kitware/VTK, and Qt 5.15's headers
(Slicer 5.10 and 5.12 build with Qt 5.15 by default), e.g. from Debian 12's qtbase5-dev without
installing it (``apt-get download qtbase5-dev && dpkg-deb -x qtbase5-dev_*.deb /tmp/qt``)::

    for v in 5.8 5.10 5.12; do
      python Testing/tools/dump_slicer_api.py /work/.mirror/Slicer+Slicer/repo $v Testing/data/slicer_api_$v.json \
        --ctk-git /work/.mirror/commontk+CTK/repo --vtk-git /work/.mirror/Kitware+VTK/repo \
        --qt-include /tmp/qt/usr/include/x86_64-linux-gnu/qt5 \
        --qt-source "Debian 12 package qtbase5-dev 5.15.8+dfsg-11+deb12u3"
    done

The VTK mirror is Kitware/VTK: Slicer builds its own fork (github.com/slicer/VTK), whose tag names
(e.g. ``slicer-v9.6.2-2026-05-15-f49a1dbaf``) end with the upstream commit they are based on; the
fork adds build fixes, not API, so the upstream commit is read. ``--commit`` reads a given commit of
the branch (the test uses it to check that a committed list is what this script writes).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

SLICER_HEADER_DIRS = ("Libs/MRML/Core", "Libs/MRML/Logic", "Libs/MRML/Widgets", "Libs/vtkSegmentationCore",
                      "Libs/vtkITK", "Base/Logic", "Base/QTCore", "Base/QTGUI")
SLICER_MODULE_SUBDIRS = ("Logic", "MRML", "Widgets", "EditorEffects")  # of Modules/Loadable/<Name>/
VTK_HEADER_DIRS = ("Common/Core", "Common/DataModel", "Common/Math", "Common/Transforms", "Common/ExecutionModel",
                   "Common/Misc", "Imaging/Core",
                   "Rendering/Core")  # vtkRenderWindowInteractor: what Segment Editor effects get mouse events from
QT_HEADER_DIRS = ("QtCore", "QtGui", "QtWidgets")  # QObject classes and the Qt bases of the listed classes
QT_OTHER_DIRS = ("QtNetwork", "QtXml", "QtSql", "QtPrintSupport")  # with the other Qt classes: names only
VTK_PYTHON_UTIL = ("numpy_support",)  # vtkmodules.util modules listed (vtk.util.numpy_support)
CTK_HEADER_DIRS = ("Libs/Core", "Libs/Widgets", "Libs/Visualization/VTK/Widgets")

# VTK/MRML macros that declare methods: macro name -> method names ({0}: the first argument)
METHOD_MACROS = {
    "vtkSetMacro": ["Set{0}"], "vtkGetMacro": ["Get{0}"],
    "vtkSetStringMacro": ["Set{0}"], "vtkGetStringMacro": ["Get{0}"],
    "vtkSetStdStringFromCharMacro": ["Set{0}"], "vtkGetCharFromStdStringMacro": ["Get{0}"],
    "vtkSetStringTokenMacro": ["Set{0}"], "vtkGetStringTokenMacro": ["Get{0}"],
    "vtkSetFilePathMacro": ["Set{0}"], "vtkGetFilePathMacro": ["Get{0}"],
    "vtkSetEnumMacro": ["Set{0}"], "vtkGetEnumMacro": ["Get{0}"],
    "vtkSetObjectMacro": ["Set{0}"], "vtkGetObjectMacro": ["Get{0}"],
    "vtkSetSmartPointerMacro": ["Set{0}"], "vtkGetSmartPointerMacro": ["Get{0}"],
    "vtkGetNewMacro": ["Get{0}"],
    "vtkSetStdVectorMacro": ["Set{0}"], "vtkGetStdVectorMacro": ["Get{0}"],
    "vtkSetVectorMacro": ["Set{0}"], "vtkGetVectorMacro": ["Get{0}"],
    "vtkSetVector2Macro": ["Set{0}"], "vtkGetVector2Macro": ["Get{0}"],
    "vtkSetVector3Macro": ["Set{0}"], "vtkGetVector3Macro": ["Get{0}"],
    "vtkSetVector4Macro": ["Set{0}"], "vtkGetVector4Macro": ["Get{0}"],
    "vtkSetVector6Macro": ["Set{0}"], "vtkGetVector6Macro": ["Get{0}"],
    "vtkSetClampMacro": ["Set{0}", "Get{0}MinValue", "Get{0}MaxValue"],
    "vtkBooleanMacro": ["{0}On", "{0}Off"],
    "vtkSetReferenceStringMacro": ["Set{0}"],
    "vtkTypeMacro": ["IsTypeOf", "IsA", "SafeDownCast", "NewInstance", "GetNumberOfGenerationsFromBaseType",
                     "GetNumberOfGenerationsFromBase"],
    "vtkAbstractTypeMacro": ["IsTypeOf", "IsA", "SafeDownCast", "NewInstance",
                             "GetNumberOfGenerationsFromBaseType", "GetNumberOfGenerationsFromBase"],
    "vtkBaseTypeMacro": ["IsTypeOf", "IsA", "SafeDownCast", "NewInstance", "GetNumberOfGenerationsFromBaseType",
                         "GetNumberOfGenerationsFromBase"],
    "vtkMRMLCopyContentMacro": ["CopyContent", "HasCopyContent"],
    "vtkMRMLCopyContentDefaultMacro": ["HasCopyContent"],
    "vtkMRMLNodeHasCopyContentMacro": ["HasCopyContent"],
    "qSlicerGetTitleMacro": ["title", "staticTitle"],
}
OBJECT_GETTERS = {"vtkGetObjectMacro": 1, "vtkGetSmartPointerMacro": 1, "vtkGetNewMacro": 1}  # arg holding the type
# Macros that stand alone in a class body (everything else in capitals is an attribute of the next member)
STANDALONE_MACRO = re.compile(r"^(Q_[A-Z_]+|QVTK_OBJECT|vtk\w*Macro|vtkMRML\w*Macro|qSlicer\w*Macro|ctk\w*Macro|"
                              r"VTK_ABI_NAMESPACE_BEGIN|VTK_ABI_NAMESPACE_END)$")
KNOWN_CLASS = re.compile(r"^((vtk|q|ctk|Q)[A-Z]\w*|Qt)$")
TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|::|->|\.\.\.|\S")
SCRUB = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)


# ---------------------------------------------------------------------------------------------- git
class Git:
    def __init__(self, git_dir: str, rev: str):
        self.git_dir, self.rev = git_dir, rev

    def _run(self, *args: str, data: bytes | None = None) -> bytes:
        return subprocess.run(["git", "--git-dir", self.git_dir, *args], input=data, check=True,
                              stdout=subprocess.PIPE).stdout

    def commit(self) -> str:
        return self._run("rev-parse", f"{self.rev}^{{commit}}").decode().strip()

    def files(self, *paths: str) -> list[str]:
        out = self._run("ls-tree", "-r", "--name-only", self.rev, "--", *paths).decode()
        return sorted(line for line in out.splitlines() if line)

    def dirs(self, path: str) -> list[str]:
        out = self._run("ls-tree", "-d", "--name-only", self.rev, "--", path.rstrip("/") + "/").decode()
        return sorted(line for line in out.splitlines() if line)

    def read(self, paths: list[str]) -> dict[str, str]:
        """The text of ``paths`` at the revision (one ``git cat-file --batch``)."""
        if not paths:
            return {}
        out = self._run("cat-file", "--batch", data="".join(f"{self.rev}:{p}\n" for p in paths).encode())
        texts, pos = {}, 0
        for path in paths:
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            size = int(header[2])
            texts[path] = out[end + 1:end + 1 + size].decode("utf-8", "replace")
            pos = end + 1 + size + 1
        return texts

    def show(self, path: str) -> str:
        return self.read([path])[path]


# ------------------------------------------------------------------------------------- C++ reader
def _preprocess(text: str) -> str:
    """Comments and strings out; directives out; of each #if chain only the first branch, none for
    code hidden from VTK's wrappers (#ifndef __VTK_WRAP__) or #if 0."""
    text = SCRUB.sub(lambda m: '""' if m.group(0)[0] in "\"'" else " ", text)
    text = re.sub(r"\\\n", " ", text)
    out, stack = [], []  # stack of (active, parent_active)
    for line in text.split("\n"):
        stripped = line.strip()
        active = all(a for a, _ in stack)
        if stripped.startswith("#"):
            directive = stripped[1:].strip()
            word = directive.split(None, 1)[0] if directive else ""
            rest = directive[len(word):].strip()
            if word in ("if", "ifdef", "ifndef"):
                hidden = ((word == "ifndef" and rest.startswith("__VTK_WRAP__"))
                          or (word == "if" and re.match(r"!\s*defined\s*\(?\s*__VTK_WRAP__", rest) is not None)
                          or (word == "if" and rest == "0"))
                stack.append([not hidden, hidden])
            elif word in ("elif", "else") and stack:
                # the branch after a hidden-from-wrapping branch is what the wrappers read
                stack[-1][0] = stack[-1][1] and word == "else"
                stack[-1][1] = False
            elif word == "endif" and stack:
                stack.pop()
            out.append("")
        else:
            out.append(line if active else "")
    return "\n".join(out)


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(_preprocess(text))


def _match(tokens: list[str], i: int) -> int:
    """Index just past the bracket group opening at ``tokens[i]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opening, closing, depth = tokens[i], pairs[tokens[i]], 0
    for j in range(i, len(tokens)):
        if tokens[j] == opening:
            depth += 1
        elif tokens[j] == closing:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(tokens)


def _split_args(tokens: list[str]) -> list[list[str]]:
    args, current, depth = [], [], 0
    for t in tokens:
        if t in "([{<":
            depth += 1
        elif t in ")]}>":
            depth -= 1
        if t == "," and depth == 0:
            args.append(current)
            current = []
        else:
            current.append(t)
    if current:
        args.append(current)
    return args


def _enum_values(body: list[str]) -> list[str]:
    names = []
    for item in _split_args(body):
        if item and re.match(r"^[A-Za-z_]\w*$", item[0]):
            names.append(item[0] + "_" if item[0] == "None" else item[0])  # VTK's Python: None -> None_
    return names


class CppClass:
    def __init__(self, name: str, bases: list[str], path: str):
        self.name, self.bases, self.path = name, bases, path
        self.methods, self.constants, self.properties, self.signals, self.slots = set(), set(), set(), set(), set()
        self.returns: dict[str, set[str]] = {}

    def add_method(self, name: str, returns: str | None = None, kind: str = "methods") -> None:
        getattr(self, kind).add(name)
        self.returns.setdefault(name, set()).add(returns or "")

    def as_json(self) -> dict:
        entry = {"file": self.path, "bases": self.bases}
        for key in ("methods", "constants", "properties", "signals", "slots"):
            if getattr(self, key):
                entry[key] = sorted(getattr(self, key))
        returns = {m: next(iter(r)) for m, r in self.returns.items() if len(r) == 1 and next(iter(r))}
        if returns:
            entry["returns"] = dict(sorted(returns.items()))
        return entry


def _class_name_and_bases(head: list[str]) -> tuple[str | None, list[str]]:
    """``class EXPORT Name : public Base, public Other`` -> ("Name", ["Base", "Other"])."""
    if ":" in head:
        colon = head.index(":")
        before, after = head[:colon], head[colon + 1:]
    else:
        before, after = head, []
    names = [t for t in before if re.match(r"^[A-Za-z_]\w*$", t) and t not in ("final", "class", "struct")]
    if not names or "VTK_WRAPEXCLUDE" in before:
        return None, []
    bases = []
    for part in _split_args(after):
        words = [t for t in part if t not in ("public", "protected", "private", "virtual")]
        if part and part[0] in ("protected", "private"):
            continue
        if "<" in words:
            words = words[:words.index("<")]
        words = [w for w in words if w != "::"]
        if words:
            bases.append(words[-1])
    return names[-1], bases


def _parse_members(cls: CppClass, body: list[str], default_access: str) -> None:
    access, kind = default_access, "methods"
    i, n = 0, len(body)
    while i < n:
        t = body[i]
        # access specifiers: public: / public slots: / signals:
        if t in ("public", "protected", "private") and i + 1 < n and body[i + 1] in (":", "slots", "Q_SLOTS"):
            access = t
            if body[i + 1] == ":":
                kind, i = "methods", i + 2
            else:
                kind, i = "slots", i + 3
            continue
        if t in ("signals", "Q_SIGNALS") and i + 1 < n and body[i + 1] == ":":
            access, kind, i = "public", "signals", i + 2
            continue
        if STANDALONE_MACRO.match(t):
            args: list[str] = []
            j = i + 1
            if j < n and body[j] == "(":
                end = _match(body, j)
                args, j = body[j + 1:end - 1], end
            if j < n and body[j] == ";":
                j += 1
            _macro(cls, t, args, access, kind)
            i = j
            continue
        # one member: up to ';' at depth 0, or a {...} block
        member, attributes, j = [], [], i
        while j < n:
            tok = body[j]
            if tok == ";":
                j += 1
                break
            if tok == "(" or tok == "[":
                end = _match(body, j)
                member.extend(body[j:end])
                j = end
                continue
            if tok == "{":
                end = _match(body, j)
                if member[:1] == ["enum"] or member[:2] == ["typedef", "enum"]:
                    if access == "public":
                        scoped = any(m in ("class", "struct") for m in member[:3])  # values not on the class
                        if not scoped:
                            cls.constants.update(_enum_values(body[j + 1:end - 1]))
                        name = [m for m in member[1:]
                                if re.match(r"^[A-Za-z_]\w*$", m) and m not in ("class", "struct")]
                        if name:
                            cls.constants.add(name[0])
                    member = ["enum-done"]
                    j = end
                    continue
                j = end
                if j < n and body[j] == ";":
                    j += 1
                if any(m in ("class", "struct", "union") for m in member[:3]):
                    member = []  # nested type
                break
            if not member and STANDALONE_MACRO.match(tok):
                break  # e.g. VTK_MARSHALEXCLUDE(...) vtkGetMacro(X, int);
            if re.match(r"^[A-Z][A-Z0-9_]+$", tok) and tok.startswith(("VTK_", "Q_", "QT_")):
                attributes.append(tok)
                if j + 1 < n and body[j + 1] == "(":
                    j = _match(body, j + 1)
                    continue
                j += 1
                continue
            member.append(tok)
            j += 1
        i = j if j > i else i + 1  # always move on
        if access != "public" or not member or member[0] in ("friend", "typedef", "using", "enum-done", "template"):
            continue
        if any(a in ("VTK_WRAPEXCLUDE", "VTK_LEGACY") for a in attributes) or "VTK_LEGACY" in member:
            continue
        if member[0] == "enum":
            continue
        _member(cls, member, kind)


def _member(cls: CppClass, member: list[str], kind: str) -> None:
    if member[0] in DEFINES and len(member) > 1 and member[1] == "(" and _match(member, 1) == len(member):
        _parse_members(cls, _expand(member[0], member[2:-1]), "public")  # vtkCreateWrappedArrayInterface(float)
        return
    if "(" in member:
        k = member.index("(")
        if k == 0:
            return
        name = member[k - 1]
        if not re.match(r"^[A-Za-z_]\w*$", name) or name in ("operator", cls.name) or \
                (k >= 2 and member[k - 2] in ("~", "operator")):
            return
        if "operator" in member[:k]:
            return
        pre = [m for m in member[:k - 1] if m not in ("virtual", "static", "inline", "const", "explicit",
                                                      "Q_INVOKABLE", "constexpr")]
        returns = None
        if len(pre) >= 2 and pre[-1] == "*" and KNOWN_CLASS.match(pre[-2]):
            returns = pre[-2]
        cls.add_method(name, returns, kind)
    elif member[0] in ("static",) or "constexpr" in member:
        end = member.index("=") if "=" in member else len(member)
        if end and re.match(r"^[A-Za-z_]\w*$", member[end - 1]):
            cls.constants.add(member[end - 1])


def _macro(cls: CppClass, name: str, args: list[str], access: str, kind: str) -> None:
    if name == "Q_PROPERTY":
        for k, t in enumerate(args):
            if t in ("READ", "WRITE", "MEMBER") and k:
                cls.properties.add(args[k - 1])
                break
        return
    if access != "public":
        return
    if name not in METHOD_MACROS:
        if name in DEFINES and not name.startswith("Q_"):  # e.g. vtkCreateWrappedArrayInterface(float)
            _parse_members(cls, _expand(name, args), "public")
        elif not re.match(r"^(Q_|QVTK_|vtk(Type|Abstract|Base)\w*Macro$)", name):
            UNKNOWN_MACROS[name] = UNKNOWN_MACROS.get(name, 0) + 1
        return
    split = _split_args(args)
    first = split[0][-1] if split and split[0] else ""
    returns = None
    if name in OBJECT_GETTERS and len(split) > OBJECT_GETTERS[name]:
        words = [w for w in split[OBJECT_GETTERS[name]] if KNOWN_CLASS.match(w)]
        returns = words[-1] if words else None
    for template in METHOD_MACROS[name]:
        cls.add_method(template.format(first), returns if template.startswith("Get") else None)


DEFINES: dict[str, tuple[list[str], list[str]]] = {}  # function-like macros of the headers read
UNKNOWN_MACROS: dict[str, int] = {}


def _expand(name: str, args: list[str]) -> list[str]:
    params, body = DEFINES[name]
    values = dict(zip(params, _split_args(args)))
    out: list[str] = []
    tokens = [tok for t in body for tok in values.get(t, [t])]
    k = 0
    while k < len(tokens):
        if tokens[k] == "#" and k + 1 < len(tokens) and tokens[k + 1] == "#" and out and k + 2 < len(tokens):
            out[-1] += tokens[k + 2]  # token pasting: Set##name
            k += 3
            continue
        out.append(tokens[k])
        k += 1
    return out


def collect_defines(text: str) -> None:
    """Function-like macros whose body declares members (``#define X(T) T GetValue(vtkIdType id) const; ...``)."""
    text = re.sub(r"\\\n", " ", SCRUB.sub(lambda m: '""' if m.group(0)[0] in "\"'" else " ", text))
    for match in re.finditer(r"^\s*#\s*define\s+(\w+)\(([^)]*)\)(.*)$", text, re.M):
        name, params, body = match.groups()
        if name in METHOD_MACROS or "#" in body.replace("##", ""):
            continue
        body_tokens = TOKEN.findall(body)
        if ";" in body_tokens and "(" in body_tokens:
            DEFINES.setdefault(name, ([p.strip() for p in params.split(",") if p.strip()], body_tokens))


def parse_header(path: str, text: str) -> list[CppClass]:
    tokens = _tokens(text)
    classes, i, n = [], 0, len(tokens)
    while i < n:
        t = tokens[i]
        if t == "template" and i + 1 < n and tokens[i + 1] == "<":
            depth, j = 0, i + 1
            while j < n:  # skip the template parameter list
                depth += tokens[j] == "<"
                depth -= tokens[j] == ">"
                j += 1
                if depth == 0:
                    break
            if j < n and tokens[j] in ("class", "struct"):
                i = j  # a class template: read as a class (vtkFloatArray derives from vtkAOSDataArrayTemplate)
                continue
            while j < n and tokens[j] not in (";", "{"):
                j += 1
            i = _match(tokens, j) if j < n and tokens[j] == "{" else j + 1
            continue
        if t in ("class", "struct") and (i == 0 or tokens[i - 1] not in ("enum", "friend")):
            j = i + 1
            while j < n and tokens[j] not in (";", "{", ")", "="):
                if tokens[j] == "(" and re.match(r"^[A-Z][A-Z0-9_]+$", tokens[j - 1]):
                    j = _match(tokens, j)  # an attribute macro such as VTK_DEPRECATED_IN_9_3_0("...")
                    continue
                if tokens[j] == "(":
                    break
                j += 1
            if j < n and tokens[j] == "{":
                name, bases = _class_name_and_bases(tokens[i + 1:j])
                end = _match(tokens, j)
                if name and KNOWN_CLASS.match(name) and not name.endswith("Private"):
                    cls = CppClass(name, bases, path)
                    _parse_members(cls, tokens[j + 1:end - 1], "public" if t == "struct" else "private")
                    if name == "vtkCommand":  # enum EventIds is declared by macros
                        cls.constants.update(re.findall(r"_vtk_add_event\(\s*(\w+)\s*\)", text))
                        cls.constants.update(w for w in ("EventIds", "NoEvent", "UserEvent") if w in text)
                    classes.append(cls)
                i = end
                continue
            i = j + 1
            continue
        if t == "namespace" and tokens[i + 1:i + 3] == ["Qt", "{"]:  # Qt's enums: qt.Qt.CaseInsensitive
            end = _match(tokens, i + 2)
            cls = CppClass("Qt", [], path)
            _parse_members(cls, tokens[i + 3:end - 1], "public")
            classes.append(cls)
            i = end
            continue
        if t == "namespace" or (t == "extern" and i + 1 < n and tokens[i + 1] == '"'):
            j = i + 1
            while j < n and tokens[j] not in ("{", ";"):
                j += 1
            i = j + 1  # enter the namespace: its contents are read as top level
            continue
        if t == "{":
            i = _match(tokens, i)
            continue
        i += 1
    return classes


def read_classes(git: Git, paths: list[str], classes: dict, origin: str) -> None:
    texts = git.read(paths)
    DEFINES.clear()
    for path in paths:
        collect_defines(texts[path])
    for path in paths:
        for cls in parse_header(path, texts[path]):
            entry = cls.as_json()
            entry["file"] = f"{origin}:{path}"
            previous = classes.get(cls.name)
            # a name declared twice (a stand-in for the wrappers or moc): keep the one in the class's own header
            if previous is None or (not _own_header(previous["file"], cls.name) and _own_header(path, cls.name)):
                classes[cls.name] = entry


class Folder:
    """Headers in a folder (Qt's, from a Qt 5.15 development package), read like a git revision."""

    def __init__(self, root: str):
        self.root = Path(root)

    def files(self, *paths: str) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for d in paths for p in (self.root / d).glob("*.h"))

    def read(self, paths: list[str]) -> dict[str, str]:
        return {p: (self.root / p).read_text(encoding="utf-8", errors="replace") for p in paths}

    def show(self, path: str) -> str:
        return (self.root / path).read_text(encoding="utf-8", errors="replace")


def _own_header(path: str, name: str) -> bool:
    return path.rsplit("/", 1)[-1].lower() == f"{name.lower()}.h"


def _header_paths(git: Git, dirs: list[str]) -> list[str]:
    paths = []
    for path in git.files(*dirs):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".h") or name.endswith("_p.h") or "Private" in name or name.startswith("ui_"):
            continue
        if any(part in ("Testing", "Plugins", "DesignerPlugins", "Resources") for part in path.split("/")):
            continue
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------- Python
def _self_attributes(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        targets = []
        if isinstance(sub, ast.Assign):
            targets = sub.targets
        elif isinstance(sub, (ast.AnnAssign, ast.AugAssign)):
            targets = [sub.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def _signature(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameter names: ``["self", "message", "*", "msec", "**kwargs"]`` (``*args``/``*`` mark where the
    keyword-only ones start)."""
    a = function.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        names.append("*")
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def _python_class(node: ast.ClassDef) -> dict:
    methods, attributes, signatures = set(), set(), {}
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            methods.add(item.name)
            signatures[item.name] = _signature(item)
        elif isinstance(item, ast.Assign):
            attributes.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            attributes.add(item.target.id)
    attributes |= _self_attributes(node)
    entry = {"bases": [ast.unparse(b) for b in node.bases], "methods": sorted(methods),
             "attributes": sorted(attributes - methods), "signatures": dict(sorted(signatures.items()))}
    # self.x = slicer.qMRMLSegmentEditorWidget() -> {"x": "qMRMLSegmentEditorWidget"}
    types: dict[str, set[str]] = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call):
            func = sub.value.func
            cls = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if not KNOWN_CLASS.match(cls):
                continue
            for target in sub.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                        target.value.id == "self":
                    types.setdefault(target.attr, set()).add(cls)
    known = {a: next(iter(t)) for a, t in types.items() if len(t) == 1}
    if known:
        entry["attribute_types"] = dict(sorted(known.items()))
    return entry


def parse_python_module(text: str) -> dict:
    tree = ast.parse(text)
    names, classes, star, exported, signatures = set(), {}, [], None, {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
            signatures[node.name] = _signature(node)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            classes[node.name] = _python_class(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                        exported = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.ImportFrom) and node.level:
            for alias in node.names:
                if alias.name == "*":
                    star.append(node.module)
                else:
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Try):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
    return {"names": names, "classes": classes, "star": star, "all": exported, "tree": tree,
            "signatures": signatures}


def _wrapper_instance_api(tree: ast.Module) -> list[str]:
    """Names ``@parameterNodeWrapper`` puts on the class (``setattr(classtype, "connectGui", ...)``) and
    on its instances (``self.parameterNode = ...`` in the ``__init__`` it installs)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and \
                isinstance(node.args[1].value, str) and getattr(node.func, "id", "") in ("setattr", "checkedSetAttr"):
            names.add(node.args[1].value)
        if isinstance(node, ast.FunctionDef) and node.name == "_initMethod":
            names |= _self_attributes(node)
    return sorted(n for n in names if not n.startswith("_") or n == "__init__")


def read_python(git: Git) -> dict:
    root = "Base/Python/slicer/"
    paths = [p for p in git.files(root) if p.endswith(".py") and "/tests/" not in p and "/release/" not in p]
    texts = git.read(paths)
    modules = {}
    for path in paths:
        rel = path[len(root):-3].replace("/", ".")
        name = "slicer" if rel == "__init__" else "slicer." + rel.removesuffix(".__init__")
        modules[name] = parse_python_module(texts[path])
    # packages: names re-exported with "from .x import *"
    for name, info in sorted(modules.items(), key=lambda kv: -kv[0].count(".")):
        for sub in info["star"]:
            sub_info = modules.get(f"{name}.{sub}")
            if sub_info is None:
                continue
            public = sub_info["all"] if sub_info["all"] is not None else \
                [n for n in sub_info["names"] if not n.startswith("_")]
            info["names"].update(public)
            info["classes"].update({c: v for c, v in sub_info["classes"].items() if c in public})
            info["signatures"].update({f: v for f, v in sub_info["signatures"].items() if f in public})
    out = {}
    for name, info in sorted(modules.items()):
        entry = {"names": sorted(n for n in info["names"] if not n.startswith("_"))}
        public_signatures = {f: v for f, v in sorted(info["signatures"].items()) if not f.startswith("_")}
        if public_signatures:
            entry["signatures"] = public_signatures
        if info["classes"]:
            entry["classes"] = {c: v for c, v in sorted(info["classes"].items()) if not c.startswith("_")}
        out[name] = entry
    wrapper = modules.get("slicer.parameterNodeWrapper.wrapper")
    if wrapper:
        out["slicer.parameterNodeWrapper"]["instance_api"] = _wrapper_instance_api(wrapper["tree"])
    # attributes set on the slicer package at start-up, as documented in its docstring
    doc = ast.get_docstring(modules["slicer"]["tree"]) or ""
    out["slicer"]["runtime"] = sorted(set(re.findall(r"\.\. py:attribute:: (\w+)", doc)))
    out["slicer"]["submodules"] = sorted(n.split(".", 1)[1] for n in modules if n.count(".") == 1)
    return out


def read_modules(git: Git) -> dict:
    modules = {}
    for kind in ("Loadable", "Scripted", "CLI"):
        for folder in git.dirs(f"Modules/{kind}"):
            name = folder.rsplit("/", 1)[-1]
            modules[name] = {"kind": kind.lower()}
    scripted = {name: f"Modules/Scripted/{name}/{name}.py" for name, v in modules.items() if v["kind"] == "scripted"}
    present = set(git.files(*scripted.values()))
    texts = git.read([p for p in scripted.values() if p in present])
    for name, path in scripted.items():
        if path in texts:
            tree = ast.parse(texts[path])
            modules[name]["classes"] = {n.name: _python_class(n) for n in tree.body if isinstance(n, ast.ClassDef)}
    return dict(sorted(modules.items()))


# -------------------------------------------------------------------------------------- externals
def ctk_commit(slicer: Git) -> str:
    text = slicer.show("SuperBuild/External_CTK.cmake")
    match = re.search(r"Slicer_\$\{proj\}_GIT_TAG\s+\"([0-9a-f]{40})\"", text)
    if not match:
        raise SystemExit("no CTK commit in SuperBuild/External_CTK.cmake")
    return match.group(1)


def vtk_commits(slicer: Git) -> tuple[str, str, str]:
    """(fork commit, its tag name, the upstream commit it is based on) for Slicer's default VTK."""
    cmake = slicer.show("CMakeLists.txt")
    minor = re.search(r'set\(_default_vtk_minor_version "(\d+)"\)', cmake)
    text = slicer.show("SuperBuild/External_VTK.cmake")
    tags = re.findall(r'set\(_git_tag "([0-9a-f]{40})"\)\s*#\s*(slicer-v(\d+)\.(\d+)\S*)', text)
    chosen = [t for t in tags if minor is None or t[3] == minor.group(1)]
    if len(chosen) != 1:
        raise SystemExit(f"cannot tell Slicer's default VTK from SuperBuild/External_VTK.cmake: {tags}")
    fork, tag = chosen[0][0], chosen[0][1]
    upstream = re.search(r"-([0-9a-f]{7,40})(?:-\d+)?$", tag)
    if not upstream:
        raise SystemExit(f"no upstream commit in the VTK tag name {tag}")
    return fork, tag, upstream.group(1)


def read_vtk_python(vtk: Git) -> dict:
    types = vtk.read(["Common/Core/vtkType.h", "Wrapping/PythonCore/PyVTKReference.cxx"])
    constants = sorted(set(re.findall(r"^\s*#\s*define\s+(VTK_[A-Z0-9_]+)\s+\S", types["Common/Core/vtkType.h"], re.M)))
    helpers = sorted(set(re.findall(r'"vtkmodules\.vtkCommonCore\.(\w+)"',
                                    types["Wrapping/PythonCore/PyVTKReference.cxx"])))
    util = {}
    paths = [f"Wrapping/Python/vtkmodules/util/{name}.py" for name in VTK_PYTHON_UTIL]
    for path, text in vtk.read(paths).items():
        stem = path.rsplit("/", 1)[-1][:-3]
        if stem == "__init__":
            continue
        try:
            info = parse_python_module(text)
        except SyntaxError:
            continue
        util[stem] = sorted(n for n in info["names"] if not n.startswith("_"))
    return {"constants": constants, "names": helpers, "util": dict(sorted(util.items()))}


# ------------------------------------------------------------------------------------------- main
def _qt_subset(qt_classes: dict, classes: dict) -> dict:
    """Qt's QObject classes (widgets, QTimer, QSettings, QCompleter ...), the Qt bases of the listed
    classes, and the Qt namespace's enums."""
    def bases(name: str) -> set[str]:
        out, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current in qt_classes and current not in out:
                out.add(current)
                todo.extend(qt_classes[current]["bases"])
        return out

    keep = {"Qt"} | {n for n in qt_classes if "QObject" in bases(n)}
    for entry in classes.values():
        for base in entry["bases"]:
            keep |= bases(base)
    return {n: qt_classes[n] for n in sorted(keep) if n in qt_classes}


def dump(slicer_git: str, branch: str, ctk_git: str, vtk_git: str, commit: str | None = None,
         qt_include: str | None = None, qt_source: str | None = None) -> dict:
    commit = Git(slicer_git, commit or branch).commit()
    slicer = Git(slicer_git, commit)
    classes: dict[str, dict] = {}
    module_dirs = [f"{d}/{sub}" for d in slicer.dirs("Modules/Loadable") for sub in SLICER_MODULE_SUBDIRS]
    read_classes(slicer, _header_paths(slicer, list(SLICER_HEADER_DIRS) + module_dirs), classes, "Slicer")

    ctk_sha = ctk_commit(slicer)
    ctk = Git(ctk_git, ctk_sha)
    read_classes(ctk, _header_paths(ctk, list(CTK_HEADER_DIRS)), classes, "CTK")

    vtk_fork, vtk_tag, vtk_upstream = vtk_commits(slicer)
    vtk = Git(vtk_git, vtk_upstream)
    vtk_sha = vtk.commit()
    vtk = Git(vtk_git, vtk_sha)
    read_classes(vtk, _header_paths(vtk, list(VTK_HEADER_DIRS)), classes, "VTK")
    # methods VTK's Python wrapper generator adds to vtkObjectBase (GetAddressAsString)
    generator = vtk.show("Wrapping/Tools/vtkWrapPythonMethodDef.c")
    base = classes["vtkObjectBase"]
    base["methods"] = sorted(set(base["methods"]) | set(re.findall(r'\{\\"(\w+)\\",\s*Py%s_', generator)))

    qt_note = "no Qt classes (no --qt-include)"
    qt_info = None
    if qt_include:
        qt = Folder(qt_include)
        qt_version = re.search(r'#define QT_VERSION_STR "([\d.]+)"', qt.show("QtCore/qconfig.h")).group(1)
        required = re.findall(r'set\(_required_qt_version "([\d.]+)"\)', slicer.show("CMakeLists.txt"))
        qt_classes: dict[str, dict] = {}
        read_classes(qt, _header_paths(qt, list(QT_HEADER_DIRS)), qt_classes, "Qt")
        subset = _qt_subset(qt_classes, classes)
        classes.update(subset)
        # the other classes of Qt's modules that PythonQt wraps: names only (QColor, QTableWidgetItem ...)
        others: set[str] = set(qt_classes) - set(subset)
        for path in _header_paths(qt, [d for d in QT_OTHER_DIRS if (qt.root / d).is_dir()]):
            others.update(c.name for c in parse_header(path, qt.show(path)))
        qt_info = {"version": qt_version, "dirs": list(QT_HEADER_DIRS), "slicer_required_qt_versions": required,
                   "source": qt_source or "Qt development headers", "other_dirs": list(QT_OTHER_DIRS),
                   "other_classes": sorted(n for n in others if re.match(r"^Q[A-Z]", n))}
        qt_note = (f"Qt {qt_version} from {qt_info['source']} (Slicer's CMakeLists.txt asks for Qt "
                   f"{' or '.join(required)}): the QObject classes and the Qt bases of the classes above; "
                   f"the names of Qt's other classes")
    return {
        "generated_by": (
            f"Testing/tools/dump_slicer_api.py from the source of 3D Slicer branch {branch} (commit {commit}); "
            f"CTK {ctk_sha} as pinned in SuperBuild/External_CTK.cmake; VTK {vtk_sha} (upstream of Slicer's fork "
            f"{vtk_tag}, {vtk_fork}) as pinned in SuperBuild/External_VTK.cmake; {qt_note}. Public C++ API read "
            f"from headers (VTK macros expanded), Slicer's Python package with ast. See the script's docstring."),
        "slicer": {"branch": branch, "commit": commit, "repository": "https://github.com/Slicer/Slicer"},
        "ctk": {"commit": ctk_sha, "repository": "https://github.com/commontk/CTK", "dirs": list(CTK_HEADER_DIRS)},
        "vtk": {"commit": vtk_sha, "slicer_fork_commit": vtk_fork, "slicer_fork_tag": vtk_tag,
                "repository": "https://github.com/Kitware/VTK", "dirs": list(VTK_HEADER_DIRS)},
        "qt": qt_info,
        "slicer_dirs": list(SLICER_HEADER_DIRS) + [f"Modules/Loadable/*/{s}" for s in SLICER_MODULE_SUBDIRS],
        "classes": dict(sorted(classes.items())),
        "python": read_python(slicer),
        "modules": read_modules(slicer),
        "vtk_python": read_vtk_python(vtk),
    }


def write(data: dict, output: str) -> None:
    """Stable, diff-friendly JSON: one line per class, module or section."""
    lines = ["{"]
    items = list(data.items())
    for k, (key, value) in enumerate(items):
        comma = "," if k < len(items) - 1 else ""
        if isinstance(value, dict) and key in ("classes", "python", "modules"):
            lines.append(f"{json.dumps(key)}: {{")
            entries = list(value.items())
            for m, (name, entry) in enumerate(entries):
                lines.append(f"{json.dumps(name)}: {json.dumps(entry, sort_keys=True)}"
                             + ("," if m < len(entries) - 1 else ""))
            lines.append("}" + comma)
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}{comma}")
    lines.append("}")
    Path(output).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slicer_git", help="git directory of a Slicer clone or mirror")
    parser.add_argument("branch", help="release branch (or any revision), e.g. 5.12")
    parser.add_argument("output")
    parser.add_argument("--ctk-git", required=True, help="git directory of a commontk/CTK clone or mirror")
    parser.add_argument("--vtk-git", required=True, help="git directory of a Kitware/VTK clone or mirror")
    parser.add_argument("--commit", help="read this commit of the branch instead of its head (to reproduce a list)")
    parser.add_argument("--qt-include", help="Qt 5.15's include folder (with QtCore/, QtGui/, QtWidgets/), e.g. "
                                             "usr/include/x86_64-linux-gnu/qt5 of Debian's qtbase5-dev")
    parser.add_argument("--qt-source", help="where the Qt headers came from, recorded in the list")
    args = parser.parse_args()
    data = dump(args.slicer_git, args.branch, args.ctk_git, args.vtk_git, args.commit, args.qt_include,
                args.qt_source)
    write(data, args.output)
    if UNKNOWN_MACROS:
        print("macros in public class bodies that declare nothing here:", dict(sorted(UNKNOWN_MACROS.items())),
              file=sys.stderr)
    print(f"{len(data['classes'])} classes, {len(data['python'])} Python modules, {len(data['modules'])} modules "
          f"-> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
