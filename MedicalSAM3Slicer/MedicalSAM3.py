"""Medical SAM3 — type a structure name, get segments you can edit (3D Slicer scripted module).

Module / Widget / Logic / Test, as in Slicer's template. The widget only wires the panel
(``Resources/UI/MedicalSAM3.ui``) to :mod:`MedicalSAM3Lib`: ``scene`` (volume node -> engine
input, result -> tagged segments with terminology, undo), ``backends`` (the local engine process
and remote servers, a background task polled from the GUI thread) and ``dependencies`` (packages
installed on first use, after the user agrees). Nothing heavy is imported when Slicer starts.
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
replaces only the segment this module made for it (Undo brings the previous one back); segments you
drew are never changed. Compute runs on this computer or on a GPU server (Compute section).
This is research software, not for clinical use.
See <a href="https://github.com/medical-sam3/SlicerMedicalSAM3#use-in-3d-slicer">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Medical SAM3 (Jiang et al.) fine-tunes Meta's SAM3 on medical images; the model runs through Hugging Face
transformers. The demo model was trained on sample CT scans from TotalSegmentator (Wasserthal et al.,
Apache 2.0).
""")


@parameterNodeWrapper
class MedicalSAM3ParameterNode:
    """What a saved scene remembers of the panel."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    prompts: str = ""
    mode: Annotated[str, Choice(["propagate", "slices"])] = "propagate"
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
        self._taskContext = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedicalSAM3.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedicalSAM3Logic()

        self.ui.deviceComboBox.addItems(["auto", "cuda", "cpu", "mps"])
        self._setupCompleter()
        self._loadSettings()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
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

        self.initializeParameterNode()
        self._updateBackendFields()
        self._updateButtons()

    def cleanup(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._timer is not None:
            self._timer.stop()
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
        if self._task is not None:
            self._task.cancel()
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
        self.ui.applyButton.enabled = ready and not running
        self.ui.applyButton.toolTip = _("Segment the structures") if ready else _(
            "Select a volume and type at least one structure name")
        self.ui.cancelButton.enabled = running
        self.ui.editButton.enabled = bool(self._parameterNode and self._parameterNode.outputSegmentation) and not running

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
            installed = self.logic.installDependencies(self.backendSettings()["backend"])
            self.ui.statusLabel.text = (_("Installed: {packages}").format(packages=", ".join(installed)) if installed
                                        else _("Everything needed is installed."))

    def onTestConnection(self) -> None:
        with _shownErrors(self.ui.statusLabel), slicer.util.tryWithErrorDisplay(_("The Medical SAM3 engine could not be reached."), waitCursor=True):
            settings = self.backendSettings()
            self.logic.installDependencies(settings["backend"])
            info = self.logic.runBlocking(lambda progress, cancel: self.logic.backend(settings).client(cancel).info())
            gpu = info.get("gpu", {}).get("name")
            self.ui.statusLabel.text = _("Connected: model {model} on {device}{gpu}, engine {version}").format(
                model=info.get("model_id"), device=info.get("device"), gpu=f" ({gpu})" if gpu else "",
                version=info.get("version"))

    def onApply(self) -> None:
        from MedicalSAM3Core.common.prompts import default_dictionary, split_prompt_text

        with _shownErrors(self.ui.statusLabel), slicer.util.tryWithErrorDisplay(_("Medical SAM3 could not start."), waitCursor=True):
            parameters = self._parameterNode
            prompts = split_prompt_text(parameters.prompts)
            warnings = [r.warning for r in default_dictionary().resolve_all(prompts) if r.warning]
            settings = self.backendSettings()
            self.logic.installDependencies(settings["backend"])
            self._task = self.logic.start(parameters.inputVolume, prompts, self.logic.options(parameters), settings)
            self._taskContext = (parameters.inputVolume, parameters.outputSegmentation, parameters.keepOverlapping,
                                 warnings)
            self.ui.progressBar.visible = True
            self.ui.progressBar.setRange(0, 0)
            self.ui.statusLabel.text = _("Starting...")
            self._updateButtons()
            self._timer.start()

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _poll(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        event = task.progress
        if event is not None:
            if event.total > 0:
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.value = event.done
            if not task.cancel_token.cancelled:
                self.ui.statusLabel.text = event.stage
        if not task.finished:
            return
        self._timer.stop()
        self._task = None
        volumeNode, segmentationNode, keepOverlapping, warnings = self._taskContext
        self.ui.progressBar.visible = False
        try:
            if task.cancelled:
                self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
                return
            try:
                with slicer.util.tryWithErrorDisplay(_("Segmentation failed; nothing was changed in the scene."),
                                                     waitCursor=True):
                    segmentationNode = self.logic.finish(task, volumeNode, segmentationNode, keepOverlapping)
            except Exception as error:  # already shown in a dialog
                self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
                return
            self._parameterNode.outputSegmentation = segmentationNode
            self.ui.statusLabel.text = self.logic.summary(task.result, warnings)
        finally:
            self._updateButtons()

    def onEdit(self) -> None:
        segmentationNode = self._parameterNode.outputSegmentation
        volumeNode = self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode:
            editor.setSourceVolumeNode(volumeNode)


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
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._local = None

    def getParameterNode(self):
        return MedicalSAM3ParameterNode(super().getParameterNode())

    @staticmethod
    def options(parameters=None, **overrides):
        from MedicalSAM3Core.common.options import SegmentOptions

        values = {}
        if parameters is not None:
            values = {"mode": parameters.mode, "score_threshold": float(parameters.scoreThreshold),
                      "window": parameters.window}
        values.update(overrides)
        options = SegmentOptions(**values)
        options.validate()
        return options

    def backend(self, settings: dict):
        """The backend for ``settings`` (see :meth:`MedicalSAM3Widget.backendSettings`); the local engine
        process is reused while its model, device and interpreter stay the same."""
        from MedicalSAM3Lib.backends import LocalServer, RemoteServer

        if settings.get("backend") == "remote":
            return RemoteServer(settings.get("url", ""), settings.get("token", ""), bool(settings.get("consent")))
        wanted = (settings.get("model", ""), settings.get("device", "auto"), settings.get("python") or None)
        if self._local is None or self._local.settings != (wanted[0], wanted[1], wanted[2] or self._local.python):
            self.shutdown()
            self._local = LocalServer(model=wanted[0], device=wanted[1], python=wanted[2])
        return self._local

    def installDependencies(self, backend: str) -> list:
        """Install what ``backend`` needs after asking the user (nothing is installed at import time)."""
        from MedicalSAM3Lib import dependencies

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

        return dependencies.ensure(backend, confirm, slicer.util.pip_install, installTorch)

    def start(self, volumeNode, prompts, options, settings):
        """Start segmenting in the background; returns a :class:`~MedicalSAM3Lib.backends.BackgroundTask`."""
        from MedicalSAM3Lib.scene import start_segmentation

        return start_segmentation(volumeNode, prompts, options, self.backend(settings))

    def finish(self, task, volumeNode, segmentationNode=None, keepOverlapping=False):
        """Write a finished task's segments (GUI thread); raises its error if it failed."""
        from MedicalSAM3Lib.scene import finish_segmentation

        # Edit > Undo restores the segments a rerun replaces. MRML records undo states only for nodes
        # that opt in, so turning the scene's undo on costs nothing for other nodes.
        if task.error is None and segmentationNode is not None:
            segmentationNode.SetUndoEnabled(True)
            slicer.mrmlScene.SetUndoOn()
        segmentationNode = finish_segmentation(task, volumeNode, segmentationNode, keepOverlapping)
        segmentationNode.SetUndoEnabled(True)
        segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentationNode

    def runBlocking(self, work):
        """Run ``work(progress, cancel)`` in the background while keeping the application responsive."""
        from MedicalSAM3Lib.backends import BackgroundTask

        task = BackgroundTask(work)
        while not task.wait(0.05):
            slicer.app.processEvents()
        if task.error is not None:
            raise task.error
        return task.result

    def segment(self, volumeNode, prompts, segmentationNode=None, options=None, backend=None,
                keepOverlapping=False):
        """Segment ``prompts`` in ``volumeNode`` and return the segmentation node (blocking, for scripts)."""
        task = self.start(volumeNode, list(prompts), options or self.options(), backend or {"backend": "local"})
        while not task.wait(0.05):
            slicer.app.processEvents()
        return self.finish(task, volumeNode, segmentationNode, keepOverlapping)

    @staticmethod
    def summary(result, warnings=()) -> str:
        lines = []
        for label in result.labels:
            found = _("{ml:.1f} ml, confidence {conf:.2f}").format(ml=label.volume_ml, conf=label.confidence) \
                if label.voxel_count else _("not found")
            lines.append(f"{label.name}: {found}")
        return "\n".join(lines + list(warnings) + list(result.warnings))

    def shutdown(self) -> None:
        if self._local is not None:
            self._local.stop()
            self._local = None


class MedicalSAM3Test(ScriptedLoadableModuleTest):
    """Runs inside 3D Slicer (Developer mode > Reload and Test, or ctest): the whole panel path on the
    sample CT shipped with the extension, with the local engine and the demo model when one is shipped
    (else a tiny random-weight model: this tests the panel, scene and engine process, not accuracy)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        widget = self._widget()
        savedModel = widget.ui.modelPathLineEdit.currentPath
        try:
            self.setUp()
            self.test_panel_segments_reruns_and_undo()
            self.setUp()
            self.test_cancel_changes_nothing()
        finally:  # the user's own model choice is a setting: put it back
            widget.ui.modelPathLineEdit.currentPath = savedModel

    def _sampleVolume(self):
        from MedicalSAM3Core.common.resources import resources_dir

        path = resources_dir() / "sample" / "example_ct_sm.nii.gz"
        self.assertTrue(path.is_file(), f"sample CT missing: {path}")
        return slicer.util.loadVolume(str(path))

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

    def _widget(self):
        slicer.util.selectModule("MedicalSAM3")
        return slicer.modules.MedicalSAM3Widget

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

    def test_panel_segments_reruns_and_undo(self):
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

        self.delayDisplay("A segment drawn by the user survives a rerun; the rerun replaces only its own")
        userId = segmentation.AddEmptySegment("my_lesion", "my lesion")
        before = segment_mask(segmentationNode, "MedicalSAM3_liver", volumeNode)
        parameters.prompts = "liver"
        parameters.scoreThreshold = 0.95  # another result for the same structure
        self._runPanel(widget)
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertIsNotNone(segmentation.GetSegment(userId))
        slicer.mrmlScene.Undo()
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
