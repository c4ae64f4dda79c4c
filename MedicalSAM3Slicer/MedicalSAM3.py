"""Medical SAM3 — type a structure name, get segments you can edit (3D Slicer scripted module).

Module / Widget / Logic / Test, as in Slicer's template. The widget only wires the panel
(``Resources/UI/MedicalSAM3.ui``) to :mod:`MedicalSAM3Lib`: ``scene`` (volume node -> engine
input, result -> tagged segments with terminology, Restore previous, edited segments kept),
``backends`` (the local engine process and remote servers; each job runs in a child process polled
from the GUI thread's timer, since Slicer's main thread keeps Python's GIL), ``dependencies``
(packages installed on first use, after the user agrees), ``terminology`` (the dictionary's
terminology context) and ``compatibility`` (supported Slicer versions). Nothing heavy is imported
when Slicer starts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# The engine's torch-free package ships next to this file (see CMakeLists.txt); in a source checkout it
# is one folder up.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "MedicalSAM3Core")) and _candidate not in sys.path:
        sys.path.append(_candidate)
        break

SETTINGS = "MedicalSAM3"
POLL_MS = 200


class MedicalSAM3(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Medical SAM3")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["Medical SAM3 for 3D Slicer developers"]
        self.parent.helpText = _("""
Type the names of the structures you want ("liver, spleen, left kidney") and press Apply: Medical SAM3
segments each of them through the whole CT or MR volume and adds one segment per structure, with its
standard terminology and color, ready to correct in the Segment Editor. Running a structure again
replaces only the segment this module made for it, and only if nobody changed it since; a segment you
drew or edited is never changed (the new result goes next to it). "Restore previous" puts back what
the last run replaced. Compute runs on this computer or on a GPU server (Compute section).
Needs 3D Slicer 5.10 or newer.
This is research software, not for clinical use.
See <a href="https://github.com/medical-sam3/SlicerMedicalSAM3#use-in-3d-slicer">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Medical SAM3 (Jiang et al.) fine-tunes Meta's SAM3 on medical images; the model runs through Hugging Face
transformers. The demo model was trained on sample CT scans from TotalSegmentator (Wasserthal et al.,
Apache 2.0).
""")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self) -> None:
        """Add the "Medical SAM3" effect (clicks, boxes, Propagate) to the Segment Editor, as Slicer's
        scripted Segment Editor effects register themselves (see SegmentEditorMedicalSAM3Lib)."""
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        effect = effects.qSlicerSegmentEditorScriptedEffect(None)
        effect.setPythonSource(os.path.join(_HERE, "SegmentEditorMedicalSAM3Lib", "SegmentEditorEffect.py")
                               .replace("\\", "/"))
        effect.self().register()


@parameterNodeWrapper
class MedicalSAM3ParameterNode:
    """What a saved scene remembers of the panel."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    prompts: str = ""
    # auto: the model's own default mode (measured best on its validation scans), else propagate
    mode: Annotated[str, Choice(["auto", "propagate", "slices", "clips"])] = "auto"
    scoreThreshold: Annotated[float, WithinRange(0.0, 0.95)] = 0.5
    window: Annotated[str, Choice(["auto", "soft_tissue", "abdomen", "lung", "bone", "brain"])] = "auto"
    keepOverlapping: bool = False


class MedicalSAM3Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._taskKind = None
        self._taskContext = None
        self._timer = None
        self._versionProblem = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedicalSAM3.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedicalSAM3Logic()

        self.ui.deviceComboBox.addItems(["auto", "cuda", "cpu", "mps"])
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self._setupCompleter()
        self._loadSettings()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.restoreButton.connect("clicked(bool)", self.onRestore)
        self.ui.resultsTableWidget.connect("cellClicked(int,int)", self.onResultClicked)
        self.ui.installButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        for widget in (self.ui.localRadioButton, self.ui.remoteRadioButton, self.ui.consentCheckBox):
            widget.connect("toggled(bool)", self._saveSettings)
        self.ui.remoteRadioButton.connect("toggled(bool)", self._updateBackendFields)
        for widget in (self.ui.serverUrlLineEdit, self.ui.tokenLineEdit):
            widget.connect("editingFinished()", self._saveSettings)
            widget.connect("textEdited(QString)", self._onServerEdited)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self._saveSettings)
        self.ui.enginePythonPathLineEdit.connect("currentPathChanged(QString)", self._saveSettings)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._saveSettings)
        self.ui.promptLineEdit.connect("textEdited(QString)", self._onPromptEdited)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

        self._versionProblem = MedicalSAM3Logic.slicerVersionProblem()
        self.initializeParameterNode()
        self._updateBackendFields()
        self._updateButtons()
        if self._versionProblem:
            self.ui.statusLabel.text = self._versionProblem

    def cleanup(self) -> None:
        self._dropTask()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    # -- parameter node (as in Slicer's template) -------------------------------------------------
    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # a run still going (or finished but not yet written) must not write into the closing scene
        self._dropTask()
        self.logic.forgetRuns()
        self._showResults(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[MedicalSAM3ParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._task is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.prompts.strip())
        usable = not self._versionProblem
        self.ui.applyButton.enabled = ready and not running and usable
        self.ui.applyButton.toolTip = self._versionProblem or (_("Segment the structures") if ready else _(
            "Select a volume and type at least one structure name"))
        self.ui.cancelButton.enabled = running
        self.ui.testConnectionButton.enabled = not running and usable
        self.ui.installButton.enabled = not running and usable
        output = self._parameterNode.outputSegmentation if self._parameterNode else None
        self.ui.editButton.enabled = bool(output) and not running
        self.ui.restoreButton.enabled = bool(output) and not running and self.logic.canRestore(output)

    # -- settings (per user, not per scene) --------------------------------------------------------
    def _loadSettings(self) -> None:
        settings = qt.QSettings()
        remote = settings.value(f"{SETTINGS}/Backend", "local") == "remote"
        self.ui.remoteRadioButton.checked = remote
        self.ui.localRadioButton.checked = not remote
        self.ui.serverUrlLineEdit.text = settings.value(f"{SETTINGS}/ServerURL", "")
        self.ui.tokenLineEdit.text = settings.value(f"{SETTINGS}/Token", "")
        self.ui.consentCheckBox.checked = str(settings.value(f"{SETTINGS}/Consent", "false")).lower() == "true"
        self.ui.modelPathLineEdit.currentPath = settings.value(f"{SETTINGS}/Model", "")
        self.ui.enginePythonPathLineEdit.currentPath = settings.value(f"{SETTINGS}/EnginePython", "")
        device = settings.value(f"{SETTINGS}/Device", "auto")
        self.ui.deviceComboBox.currentIndex = max(0, self.ui.deviceComboBox.findText(device))

    def _saveSettings(self, *args) -> None:
        settings = qt.QSettings()
        settings.setValue(f"{SETTINGS}/Backend", "remote" if self.ui.remoteRadioButton.checked else "local")
        settings.setValue(f"{SETTINGS}/ServerURL", self.ui.serverUrlLineEdit.text.strip())
        settings.setValue(f"{SETTINGS}/Token", self.ui.tokenLineEdit.text.strip())
        settings.setValue(f"{SETTINGS}/Consent", "true" if self.ui.consentCheckBox.checked else "false")
        settings.setValue(f"{SETTINGS}/Model", self.ui.modelPathLineEdit.currentPath.strip())
        settings.setValue(f"{SETTINGS}/EnginePython", self.ui.enginePythonPathLineEdit.currentPath.strip())
        settings.setValue(f"{SETTINGS}/Device", self.ui.deviceComboBox.currentText)

    def _updateBackendFields(self, *args) -> None:
        remote = self.ui.remoteRadioButton.checked
        for widget in (self.ui.serverUrlLineEdit, self.ui.tokenLineEdit, self.ui.consentCheckBox):
            widget.enabled = remote
        for widget in (self.ui.modelPathLineEdit, self.ui.deviceComboBox, self.ui.enginePythonPathLineEdit):
            widget.enabled = not remote

    def _onServerEdited(self, text) -> None:
        # consent is given for one server: editing its address or token asks again
        self.ui.consentCheckBox.checked = False

    def backendSettings(self) -> dict:
        return {"backend": "remote" if self.ui.remoteRadioButton.checked else "local",
                "url": self.ui.serverUrlLineEdit.text, "token": self.ui.tokenLineEdit.text,
                "consent": self.ui.consentCheckBox.checked, "model": self.ui.modelPathLineEdit.currentPath.strip(),
                "device": self.ui.deviceComboBox.currentText,
                "python": self.ui.enginePythonPathLineEdit.currentPath.strip()}

    # -- prompt completion -------------------------------------------------------------------------
    def _setupCompleter(self) -> None:
        from MedicalSAM3Core.common.prompts import default_dictionary

        self._completer = qt.QCompleter(default_dictionary().completions())
        self._completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self._completer.setWidget(self.ui.promptLineEdit)
        self._completer.connect("activated(QString)", self._onCompletion)

    def _onPromptEdited(self, text) -> None:
        token = text[: self.ui.promptLineEdit.cursorPosition].split(",")[-1].lstrip()
        if len(token) < 2:
            self._completer.popup().hide()
            return
        self._completer.setCompletionPrefix(token)
        if self._completer.completionCount() > 0:
            self._completer.complete()
        else:
            self._completer.popup().hide()

    def _onCompletion(self, completion) -> None:
        text = self.ui.promptLineEdit.text
        cursor = self.ui.promptLineEdit.cursorPosition
        head, tail = text[:cursor], text[cursor:]
        start = head.rfind(",") + 1
        prefix = head[:start] + (" " if start else "")
        self.ui.promptLineEdit.text = prefix + completion + tail
        self.ui.promptLineEdit.cursorPosition = len(prefix + completion)
        self._parameterNode.prompts = self.ui.promptLineEdit.text

    # -- actions -----------------------------------------------------------------------------------
    def onInstallDependencies(self) -> None:
        with _shownErrors(self.ui.statusLabel), slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed."), waitCursor=True):
            installed = self.logic.installDependencies(self.backendSettings(), askDeclined=True)
            self.ui.statusLabel.text = (_("Installed: {packages}").format(packages=", ".join(installed)) if installed
                                        else _("Everything needed is installed."))

    def onTestConnection(self) -> None:
        """Ask the engine for its versions, model and device, in the background (Cancel stops it)."""
        with _shownErrors(self.ui.statusLabel), slicer.util.tryWithErrorDisplay(_("The Medical SAM3 engine could not be reached."), waitCursor=True):
            settings = self.backendSettings()
            self.logic.installDependencies(settings)
            self._startTask("info", self.logic.startInfo(settings), None, _("Connecting..."))

    def onApply(self) -> None:
        from MedicalSAM3Core.common.prompts import default_dictionary, split_prompt_text

        with _shownErrors(self.ui.statusLabel), slicer.util.tryWithErrorDisplay(_("Medical SAM3 could not start."), waitCursor=True):
            parameters = self._parameterNode
            prompts = split_prompt_text(parameters.prompts)
            warnings = [r.warning for r in default_dictionary().resolve_all(prompts) if r.warning]
            settings = self.backendSettings()
            self.logic.installDependencies(settings)
            task = self.logic.start(parameters.inputVolume, prompts, self.logic.options(parameters), settings)
            self._startTask("segment", task, (parameters.inputVolume, parameters.outputSegmentation,
                                              parameters.keepOverlapping, warnings), _("Starting..."))

    def _startTask(self, kind, task, context, status) -> None:
        self._task, self._taskKind, self._taskContext = task, kind, context
        self.ui.progressBar.visible = True
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = status
        self._updateButtons()
        self._timer.start()

    def _dropTask(self) -> None:
        """Cancel the running task and forget it: nothing it returns is shown or written, and its job
        folder (a copy of the voxels) is removed now."""
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.dropActiveTask()
        self._task = self._taskKind = self._taskContext = None
        if hasattr(self, "ui"):
            self.ui.progressBar.visible = False
            self._updateButtons()

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _poll(self) -> None:
        """The timer's tick (GUI thread): show progress; once the task ended, show or write its outcome.
        Reads two small files at most; the job itself runs in its own process."""
        task = self._task
        if task is None:
            self._timer.stop()
            return
        event = task.progress
        if event is not None:
            if event.total > 0:
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.value = event.done
            if not task.cancel_requested:
                timeLeft = task.time_left()
                self.ui.statusLabel.text = event.stage + (f" ({timeLeft})" if timeLeft else "")
        question = task.long_run_question() if self._taskKind == "segment" else None
        if question:
            self._timer.stop()  # no ticks while the question is open (its event loop would run them)
            goOn = slicer.util.confirmOkCancelDisplay(question, _("Long segmentation"))
            if self._task is not task:  # the scene closed meanwhile
                return
            if not goOn:
                self.onCancel()
            self._timer.start()
        if not task.finished:
            return
        kind, context = self._taskKind, self._taskContext
        self._timer.stop()
        self._task = self._taskKind = self._taskContext = None
        self.ui.progressBar.visible = False
        try:
            if task.cancelled:
                self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            elif kind == "info":
                self._showConnection(task)
            else:
                self._writeSegments(task, *context)
        finally:
            self._updateButtons()

    def _showConnection(self, task) -> None:
        if task.error is not None:
            self.ui.statusLabel.text = str(task.error)
            slicer.util.errorDisplay(_("The Medical SAM3 engine could not be reached."), detailedText=str(task.error))
            return
        self.ui.statusLabel.text = self.logic.connectionSummary(task.result)

    def _writeSegments(self, task, volumeNode, segmentationNode, keepOverlapping, warnings) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed; nothing was changed in the scene."),
                                                 waitCursor=True):
                report = self.logic.finish(task, volumeNode, segmentationNode, keepOverlapping)
        except Exception as error:  # already shown in a dialog
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            return
        self._parameterNode.outputSegmentation = report.node
        self._showResults(report)
        self.ui.statusLabel.text = self.logic.summary(task.result, warnings, report)

    def _showResults(self, report) -> None:
        """The results table: structure, confidence, volume, slices; rows to check marked."""
        table = self.ui.resultsTableWidget
        table.setRowCount(0)
        show = report is not None and bool(report.rows)
        table.setVisible(show)  # (reading .visible back is False while the panel itself is hidden)
        if not show:
            return
        table.setRowCount(len(report.rows))
        for row, line in enumerate(report.rows):
            cells = [line.name, f"{line.confidence:.2f}" if line.found else "-",
                     f"{line.volume_ml:.1f}" if line.found else _("not found"), str(line.slices)]
            why = self.logic.checkReason(line)
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(("⚠ " if why and column == 0 else "") + text)
                item.setData(qt.Qt.UserRole, line.segment_id)
                if why:
                    item.setToolTip(why)
                    item.setForeground(qt.QBrush(qt.QColor(200, 90, 0)))
                table.setItem(row, column, item)

    def onResultClicked(self, row, column) -> None:
        item = self.ui.resultsTableWidget.item(row, 0)
        segmentationNode = self._parameterNode.outputSegmentation if self._parameterNode else None
        if item is not None and segmentationNode is not None:
            self.logic.centerViewsOnSegment(segmentationNode, item.data(qt.Qt.UserRole))

    def onRestore(self) -> None:
        with _shownErrors(self.ui.statusLabel), slicer.util.tryWithErrorDisplay(_("Could not restore the previous segments."), waitCursor=True):
            report = self.logic.restorePrevious(self._parameterNode.outputSegmentation)
            self._showResults(None)
            self.ui.statusLabel.text = self.logic.restoreSummary(report)
        self._updateButtons()

    def onEdit(self) -> None:
        segmentationNode = self._parameterNode.outputSegmentation
        volumeNode = self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode:
            editor.setSourceVolumeNode(volumeNode)
        editor.setActiveEffectByName("Medical SAM3")  # correct with clicks and boxes


class _shownErrors:
    """Ends a Qt slot quietly after ``tryWithErrorDisplay`` has shown its error in a dialog (it re-raises),
    keeping the message in the panel's status line."""

    def __init__(self, statusLabel) -> None:
        self._statusLabel = statusLabel

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        logging.info("Medical SAM3: %s", error)
        self._statusLabel.text = str(error)
        return True


class MedicalSAM3Logic(ScriptedLoadableModuleLogic):
    """Usable from Slicer's Python console without the panel::

        logic = slicer.util.getModuleLogic("MedicalSAM3")
        segmentation = logic.segment(volumeNode, ["liver", "spleen"])          # this computer
        segmentation = logic.segment(volumeNode, ["liver"], backend={"backend": "remote",
                           "url": "https://gpu-box:8765", "token": "...", "consent": True})
        logic.restorePrevious(segmentation)                                    # undo that run
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._local = None
        self._activeTask = None
        self._lastRuns = {}  # segmentation node ID -> RunRecord of the last run that wrote into it

    def getParameterNode(self):
        return MedicalSAM3ParameterNode(super().getParameterNode())

    @staticmethod
    def slicerVersionProblem():
        """None on a supported Slicer, else the sentence saying which Slicer is needed."""
        from MedicalSAM3Lib.compatibility import version_problem

        return version_problem(slicer.app.majorVersion, slicer.app.minorVersion)

    @staticmethod
    def options(parameters=None, **overrides):
        from MedicalSAM3Core.common.options import SegmentOptions

        values = {}
        if parameters is not None:
            values = {"mode": None if parameters.mode == "auto" else parameters.mode,
                      "score_threshold": float(parameters.scoreThreshold),
                      "window": parameters.window}
        values.update(overrides)
        options = SegmentOptions(**values)
        options.validate()
        return options

    @staticmethod
    def savedBackendSettings() -> dict:
        """The Compute section's settings as last saved (:meth:`MedicalSAM3Widget.backendSettings`' keys),
        for the Segment Editor effect, which has no panel of its own."""
        settings = qt.QSettings()
        return {"backend": "remote" if settings.value(f"{SETTINGS}/Backend", "local") == "remote" else "local",
                "url": settings.value(f"{SETTINGS}/ServerURL", ""), "token": settings.value(f"{SETTINGS}/Token", ""),
                "consent": str(settings.value(f"{SETTINGS}/Consent", "false")).lower() == "true",
                "model": settings.value(f"{SETTINGS}/Model", ""), "device": settings.value(f"{SETTINGS}/Device", "auto"),
                "python": settings.value(f"{SETTINGS}/EnginePython", "")}

    def backend(self, settings: dict):
        """The backend for ``settings`` (see :meth:`MedicalSAM3Widget.backendSettings`); the local engine
        process is reused while its model, device and interpreter stay the same, and is not replaced
        while a run uses it. An interpreter other than Slicer's own starts from Slicer's startup
        environment (Slicer's PYTHONHOME/PYTHONPATH would break it)."""
        from MedicalSAM3Lib.backends import BackendError, LocalServer, RemoteServer

        if settings.get("backend") == "remote":
            return RemoteServer(settings.get("url", ""), settings.get("token", ""), bool(settings.get("consent")))
        python = settings.get("python") or None
        wanted = (settings.get("model", ""), settings.get("device", "auto"), python)
        if self._local is None or self._local.settings != (wanted[0], wanted[1], python or self._local.python):
            if self._local is not None and self._activeTask is not None and not self._activeTask.finished:
                raise BackendError("a segmentation is running on the local engine: wait for it or cancel it before "
                                   "changing the model, device or Python environment")
            self.shutdown()
            baseEnv = slicer.util.startupEnvironment() if python else None
            self._local = LocalServer(model=wanted[0], device=wanted[1], python=python, base_env=baseEnv)
        return self._local

    def installDependencies(self, settings, askDeclined: bool = False) -> list:
        """Install what the backend in ``settings`` needs into Slicer's Python after asking the user
        (nothing is installed at import time). ``settings``: :meth:`MedicalSAM3Widget.backendSettings`
        or a backend name. With another *Engine Python*, nothing but the optional ``zstandard`` is
        installed here (the engine's packages belong in that environment). Packages Slicer ships are
        held at their installed versions; the rest at the versions tested for this Slicer
        (``requirements/constraints-slicer-<version>.txt``). Declined optional packages are remembered
        in ``MedicalSAM3/DeclinedPackages`` and offered again only with ``askDeclined`` (Install dependencies)."""
        from MedicalSAM3Lib import dependencies

        if isinstance(settings, str):
            settings = {"backend": settings}

        def confirm(packages) -> bool:
            return slicer.util.confirmOkCancelDisplay(
                _("Medical SAM3 needs additional Python packages. Installing them needs a network connection "
                  "and may take several minutes. Install now?"),
                _("Install Python packages"), detailedText=", ".join(packages))

        def installTorch(versionSpec: str) -> bool:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                return False
            return PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=versionSpec) is not None

        try:
            import slicer.packaging as packaging  # Slicer >= 5.12
        except ModuleNotFoundError:
            packaging = None  # Slicer 5.10: slicer.util.pip_install([... "-c", FILE])
        qsettings = qt.QSettings()
        key = f"{SETTINGS}/DeclinedPackages"
        declined = [name for name in str(qsettings.value(key, "") or "").split(",") if name]
        result = dependencies.ensure(
            settings["backend"], confirm, slicer.util.pip_install, installTorch,
            slicer_version=f"{slicer.app.majorVersion}.{slicer.app.minorVersion}", packaging=packaging,
            declined=declined, ask_declined=askDeclined, engine_python_is_slicer=not settings.get("python"))
        remembered = result.remembered(declined)
        if remembered != sorted(declined):
            qsettings.setValue(key, ",".join(remembered))
        return list(result.installed)

    def _track(self, task):
        self._activeTask = task
        return task

    def dropActiveTask(self) -> None:
        """Cancel the running task, if any, stop its process and remove its job folder (nothing of it
        is written); for a scene that closes, a module reload, Slicer quitting."""
        task, self._activeTask = self._activeTask, None
        if task is not None:
            task.close()

    def start(self, volumeNode, prompts, options, settings):
        """Start segmenting in the background; returns a :class:`~MedicalSAM3Lib.backends.ProcessTask`.
        Raises before anything starts (and before the scene changes) on an unsupported Slicer or bad input."""
        from MedicalSAM3Core.common.errors import InputError
        from MedicalSAM3Lib.scene import start_segmentation

        problem = self.slicerVersionProblem()
        if problem:
            raise InputError(problem)
        return self._track(start_segmentation(volumeNode, prompts, options, self.backend(settings)))

    def startInfo(self, settings):
        """Ask the backend for its versions, model and device in the background (a ProcessTask)."""
        from MedicalSAM3Lib.backends import start_job

        return self._track(start_job(self.backend(settings), "info"))

    def loadTerminology(self) -> None:
        """Load the prompt dictionary's terminology context (idempotent), so Slicer's terminology
        selector shows the segments' category, type and laterality."""
        from MedicalSAM3Lib import terminology

        try:
            terminology.load_context(slicer.modules.terminologies.logic())
        except Exception as error:  # the segments are written all the same; their codes stay in the tags
            logging.warning("Medical SAM3: could not load its terminology context: %s", error)

    def finish(self, task, volumeNode, segmentationNode=None, keepOverlapping=False):
        """Write a finished task's segments (GUI thread); raises its error if it failed. Returns the
        :class:`~MedicalSAM3Lib.scene.WriteReport`; the run can then be undone with :meth:`restorePrevious`."""
        from MedicalSAM3Lib.scene import finish_segmentation

        self.loadTerminology()
        report = finish_segmentation(task, volumeNode, segmentationNode, keepOverlapping)
        self._lastRuns[report.node.GetID()] = report.record
        report.node.CreateClosedSurfaceRepresentation()
        return report

    def canRestore(self, segmentationNode) -> bool:
        return segmentationNode is not None and segmentationNode.GetID() in self._lastRuns

    def restorePrevious(self, segmentationNode):
        """Put back what the last run on ``segmentationNode`` replaced and remove what it added; segments
        changed since are kept. Returns a :class:`~MedicalSAM3Lib.scene.RestoreReport`."""
        from MedicalSAM3Core.common.errors import InputError
        from MedicalSAM3Lib.scene import restore_previous

        record = self._lastRuns.pop(segmentationNode.GetID(), None) if segmentationNode is not None else None
        if record is None:
            raise InputError(_("There is no Medical SAM3 run to restore on this segmentation."))
        return restore_previous(record, slicer.mrmlScene)

    def forgetRuns(self) -> None:
        self._lastRuns.clear()

    @staticmethod
    def centerViewsOnSegment(segmentationNode, segmentId) -> bool:
        """Centre the slice views on a segment (its center in world coordinates); False when it is empty."""
        from MedicalSAM3Lib.scene import segment_center_ras

        center = segment_center_ras(segmentationNode, segmentId)
        if center is None:
            return False
        slicer.modules.markups.logic().JumpSlicesToLocation(*center, True)
        return True

    def segment(self, volumeNode, prompts, segmentationNode=None, options=None, backend=None,
                keepOverlapping=False):
        """Segment ``prompts`` in ``volumeNode`` and return the segmentation node (blocking, for scripts)."""
        task = self.start(volumeNode, list(prompts), options or self.options(), backend or {"backend": "local"})
        while not task.wait(0.05):
            slicer.app.processEvents()
        return self.finish(task, volumeNode, segmentationNode, keepOverlapping).node

    @staticmethod
    def checkReason(row) -> str:
        """Why a results-table row is marked for checking ('' when it is not)."""
        from MedicalSAM3Lib.scene import FEW_SLICES, LOW_CONFIDENCE

        if not row.needs_check:
            return ""
        if not row.found:
            return _("Not found: nothing above the score threshold")
        if row.confidence < LOW_CONFIDENCE:
            return _("Low confidence (below {value:.2f}): check it").format(value=LOW_CONFIDENCE)
        return _("Found on fewer than {count} slices: check it is not a stray detection").format(count=FEW_SLICES)

    @staticmethod
    def summary(result, warnings=(), report=None) -> str:
        lines = []
        for label in result.labels:
            found = _("{ml:.1f} ml, confidence {conf:.2f}").format(ml=label.volume_ml, conf=label.confidence) \
                if label.voxel_count else _("not found")
            lines.append(f"{label.name}: {found}")
        for kept, new in (report.kept_edited.items() if report is not None else ()):
            lines.append(_("'{kept}' was changed after Medical SAM3 wrote it, so it was kept; the new result is "
                           "'{new}'.").format(kept=kept, new=new))
        return "\n".join(lines + list(warnings) + list(result.warnings))

    @staticmethod
    def restoreSummary(report) -> str:
        lines = []
        if report.restored:
            lines.append(_("Restored: {names}").format(names=", ".join(report.restored)))
        if report.removed:
            lines.append(_("Removed: {names}").format(names=", ".join(report.removed)))
        if report.kept_edited:
            lines.append(_("Kept (changed since that run): {names}").format(names=", ".join(report.kept_edited)))
        return "\n".join(lines) or _("Nothing to restore: the segments of that run were removed.")

    @staticmethod
    def connectionSummary(info) -> str:
        import MedicalSAM3Core

        gpu = info.get("gpu", {}).get("name")
        text = _("Connected: model {model} on {device}{gpu}, engine {version}").format(
            model=info.get("model_id"), device=info.get("device"), gpu=f" ({gpu})" if gpu else "",
            version=info.get("version"))
        if info.get("version") != MedicalSAM3Core.__version__:
            text += _(" (this extension: {version}; compatible)").format(version=MedicalSAM3Core.__version__)
        return text

    def shutdown(self) -> None:
        self.dropActiveTask()
        if self._local is not None:
            self._local.stop()
            self._local = None


class MedicalSAM3Test(ScriptedLoadableModuleTest):
    """Runs inside 3D Slicer (Developer mode > Reload and Test, or ctest).

    By default (what the ctest on Slicer's build machines runs) only the light part: the panel loads,
    and a result computed here with numpy is written, rerun and restored through the module's scene
    logic (no PyTorch, no engine, nothing installed). Set ``MEDICALSAM3_SELFTEST_COMPUTE=1`` to also
    run the whole panel path on the sample CT shipped with the extension, with the local engine and
    the demo model (this installs the engine's dependencies after asking, and takes minutes on a CPU).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel_loads_on_a_supported_slicer()
        self.setUp()
        self.test_segments_rerun_edit_and_restore()
        if os.environ.get("MEDICALSAM3_SELFTEST_COMPUTE") != "1":
            logging.warning("Medical SAM3 self-test: the compute part was skipped (set MEDICALSAM3_SELFTEST_COMPUTE=1)")
            return
        widget = self._widget()
        savedModel = widget.ui.modelPathLineEdit.currentPath
        try:
            self.setUp()
            self.test_panel_segments_and_reruns()
            self.setUp()
            self.test_cancel_changes_nothing()
        finally:  # the user's own model choice is a setting: put it back
            widget.ui.modelPathLineEdit.currentPath = savedModel

    def _sampleVolume(self):
        from MedicalSAM3Core.common.resources import resources_dir

        path = resources_dir() / "sample" / "example_ct_sm.nii.gz"
        self.assertTrue(path.is_file(), f"sample CT missing: {path}")
        return slicer.util.loadVolume(str(path))

    def _widget(self):
        slicer.util.selectModule("MedicalSAM3")
        return slicer.modules.MedicalSAM3Widget

    def test_panel_loads_on_a_supported_slicer(self):
        self.assertIsNone(MedicalSAM3Logic.slicerVersionProblem())
        widget = self._widget()
        self.assertTrue(widget.ui.applyButton is not None and widget.ui.restoreButton is not None)
        self.assertFalse(widget.ui.restoreButton.enabled)

    def _fakeResult(self, volumeNode, box):
        """A result on the volume's grid computed with numpy, as the engine would return it."""
        import numpy as np

        from MedicalSAM3Core.common.prompts import default_dictionary
        from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult
        from MedicalSAM3Lib.scene import volume_from_node

        volume = volume_from_node(volumeNode)
        labelMap = np.zeros(volume.shape, np.uint8)
        labelMap[box] = 1
        concept = default_dictionary().resolve("liver").concept
        label = LabelInfo(1, concept.name, "liver", concept.name.lower(), tuple(concept.color), True, 0.9, 0.9,
                          int(labelMap.sum()), float(labelMap.sum()) * volume.voxel_volume_ml,
                          int(labelMap.any(axis=(1, 2)).sum()), concept.terminology())
        return SegmentationResult(labelMap, volume.geometry, [label])

    def test_segments_rerun_edit_and_restore(self):
        import numpy as np

        from MedicalSAM3Lib.scene import segment_mask, write_segments

        self.delayDisplay("Writing, rerunning and restoring segments")
        logic = MedicalSAM3Logic()
        volumeNode = self._sampleVolume()
        first = write_segments(self._fakeResult(volumeNode, np.s_[10:20, 20:40, 20:40]), volumeNode)
        logic._lastRuns[first.node.GetID()] = first.record
        before = segment_mask(first.node, "MedicalSAM3_liver", volumeNode)
        second = write_segments(self._fakeResult(volumeNode, np.s_[12:16, 30:50, 30:50]), volumeNode, first.node)
        logic._lastRuns[second.node.GetID()] = second.record
        self.assertTrue(logic.canRestore(second.node))
        logic.restorePrevious(second.node)
        np.testing.assert_array_equal(segment_mask(first.node, "MedicalSAM3_liver", volumeNode), before)
        self.assertTrue(logic.centerViewsOnSegment(first.node, "MedicalSAM3_liver"))

        self.delayDisplay("A segment the user changed is kept by a rerun")
        first.node.GetSegmentation().GetSegment("MedicalSAM3_liver").SetName("Liver, checked")
        third = write_segments(self._fakeResult(volumeNode, np.s_[12:16, 30:50, 30:50]), volumeNode, first.node)
        self.assertEqual(third.kept_edited, {"Liver, checked": "Liver"})  # renamed by the user: the name is free
        np.testing.assert_array_equal(segment_mask(first.node, "MedicalSAM3_liver", volumeNode), before)
        self.assertEqual(first.node.GetSegmentation().GetNumberOfSegments(), 2)
        self.delayDisplay("Test passed")

    def _testModel(self) -> str:
        """The shipped demo model when there is one; else a tiny RANDOM-weight model (the panel path is
        what is tested here, not accuracy), written by the engine's own command in its own process."""
        import subprocess
        import tempfile

        from MedicalSAM3Core.common.resources import resources_dir
        from MedicalSAM3Lib.backends import engine_python

        if (resources_dir() / "demo_model" / "config.json").is_file():
            return ""
        folder = os.path.join(tempfile.mkdtemp(prefix="medsam3-selftest-"), "tiny")
        engineRoot = os.path.dirname(os.path.dirname(os.path.abspath(
            __import__("MedicalSAM3Core").__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (engineRoot, os.environ.get("PYTHONPATH")) if p))
        subprocess.run([engine_python(), "-m", "MedicalSAM3Core", "make-tiny-model", folder], check=True, env=env)
        return folder

    def _prepareLocal(self, widget):
        widget.ui.localRadioButton.checked = True
        widget.logic.installDependencies("local")
        if not hasattr(self, "_model"):
            self._model = self._testModel()
        widget.ui.modelPathLineEdit.currentPath = self._model
        return widget

    def _waitForPanel(self, widget, timeout_s):
        import time

        deadline = time.monotonic() + timeout_s
        while widget._task is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertIsNone(widget._task, f"the run did not end within {timeout_s} s")

    def _runPanel(self, widget, timeout_s=900):
        widget.ui.applyButton.click()
        self._waitForPanel(widget, timeout_s)

    def test_panel_segments_and_reruns(self):
        import numpy as np

        from MedicalSAM3Lib.scene import PROMPT_TAG, segment_mask, segment_tag

        self.delayDisplay("Segmenting the sample CT from the panel")
        volumeNode = self._sampleVolume()
        widget = self._prepareLocal(self._widget())
        parameters = widget._parameterNode
        parameters.inputVolume = volumeNode
        parameters.prompts = "liver, spleen"
        parameters.mode = "slices"
        parameters.scoreThreshold = 0.0 if self._model else 0.5  # random weights: keep every slice's best
        self._runPanel(widget)
        segmentationNode = parameters.outputSegmentation
        self.assertIsNotNone(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["Liver", "Spleen"])
        liver = segmentation.GetSegment("MedicalSAM3_liver")
        self.assertEqual(segment_tag(liver, PROMPT_TAG), "Liver")
        self.assertIn("10200004", liver.GetTerminology())  # SNOMED CT: Liver
        self.assertGreater(segment_mask(segmentationNode, "MedicalSAM3_liver", volumeNode).sum(), 0)
        self.assertEqual(widget.ui.resultsTableWidget.rowCount, 2)

        self.delayDisplay("A segment drawn by the user survives a rerun; the rerun replaces only its own")
        userId = segmentation.AddEmptySegment("my_lesion", "my lesion")
        before = segment_mask(segmentationNode, "MedicalSAM3_liver", volumeNode)
        parameters.prompts = "liver"
        parameters.scoreThreshold = 0.95  # another result for the same structure
        self._runPanel(widget)
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertIsNotNone(segmentation.GetSegment(userId))
        self.assertTrue(widget.ui.restoreButton.enabled)
        widget.ui.restoreButton.click()
        np.testing.assert_array_equal(segment_mask(segmentationNode, "MedicalSAM3_liver", volumeNode), before)
        self.delayDisplay("Test passed")

    def test_cancel_changes_nothing(self):
        self.delayDisplay("Cancelling a run leaves the scene as it was")
        volumeNode = self._sampleVolume()
        widget = self._prepareLocal(self._widget())
        parameters = widget._parameterNode
        parameters.inputVolume = volumeNode
        parameters.outputSegmentation = None
        parameters.prompts = "liver, spleen, aorta"
        parameters.mode = "propagate"
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        widget.ui.applyButton.click()
        widget.ui.cancelButton.click()
        self._waitForPanel(widget, 60)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Test passed")
