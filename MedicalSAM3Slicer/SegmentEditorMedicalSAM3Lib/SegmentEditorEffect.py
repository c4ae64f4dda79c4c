"""The "Medical SAM3" Segment Editor effect: correct the selected segment with clicks and boxes.

Why a Segment Editor effect and not controls in the module's panel:

* **Masking.** An effect writes through ``modifySegmentByLabelmap``, i.e. through
  ``vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`` with the user's Segment Editor node: the
  editable area, the intensity range and "modify other segments" (overwrite all / visible / none)
  apply exactly as they do for Paint, Draw or Grow from seeds. Other segments change only where the
  user allowed it. Peer extensions that write from a panel bypass these settings.
* **Undo.** ``saveStateForUndo`` puts each interaction on the editor's own history, so Ctrl+Z / Z
  (installed by the Segment Editor module) undoes one click, box or propagation, along with everything
  else the user did in the editor.
* **Segment selection.** The effect works on the segment selected in the editor, whichever it is: a
  segment the user drew, one from the module's text mode, or a new empty one. It also works with the
  editor's source volume and segmentation selectors. Left clicks in slice views are consumed (no
  window/level while placing points).

All scene logic is in :mod:`MedicalSAM3Lib.interactive` (tested on slicer-core). This file only turns
mouse events into its calls and polls background calls with a ``QTimer``. The engine runs in the
module's backend (the local engine process or a remote server, chosen in the module's Compute
section) as a ``RemoteSession``. Opening it (the engine may have to start; the volume is uploaded) and
Propagate run in the background, with progress and Cancel. A click is a small request answered in
tens of milliseconds, made on the GUI thread.

Loaded by ``qSlicerSegmentEditorScriptedEffect.setPythonSource``. The module is this folder's name
(``SegmentEditorMedicalSAM3Lib``) and the class is the file's name (``SegmentEditorEffect``), as in
Slicer's ScriptedSegmentEditorEffect template. Hence the absolute imports.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

if TYPE_CHECKING:  # for readers and the Slicer API test: the classes of what the Segment Editor passes
    from slicer import qMRMLAbstractViewWidget, qSlicerSegmentEditorScriptedEffect
    from vtk import vtkRenderWindowInteractor

POLL_MS = 50
MODES = ("positive", "negative", "box")


class _EffectWriter:
    """Writes as every Segment Editor effect does (see MedicalSAM3Lib.interactive.EditorLogicWriter)."""

    def __init__(self, scriptedEffect: "qSlicerSegmentEditorScriptedEffect") -> None:
        self.scriptedEffect = scriptedEffect

    def selected(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        if parameterSetNode is None:
            return None, None
        return parameterSetNode.GetSegmentationNode(), parameterSetNode.GetSelectedSegmentID()

    def save_state(self) -> None:
        self.scriptedEffect.saveStateForUndo()

    def modify(self, segmentationNode, segmentId, modifier) -> None:
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, modifier,
                                                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
                                                    list(modifier.GetExtent()))


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Medical SAM3: positive/negative points and boxes on the slice views, Propagate (see the module docstring)."""

    def __init__(self, scriptedEffect: "qSlicerSegmentEditorScriptedEffect") -> None:
        scriptedEffect.name = "Medical SAM3"
        scriptedEffect.title = "Medical SAM3"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.scriptedEffect = scriptedEffect
        self._workspace = None  # MedicalSAM3Lib.interactive.Workspace of the open session
        self._volumeId = None  # the source volume the session was opened on
        self._opening = None  # BackgroundCall opening a session
        self._propagation = None  # BackgroundCall of a running propagation
        self._afterOpen = None  # what to do once the session is open
        self._dragStart = None  # (view widget, world position) of a box being dragged
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)
        self._sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self._onSceneClose)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "Icons",
                            "MedicalSAM3.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self) -> str:
        return ("<html>Correct the selected segment with Medical SAM3.<p>"
                "<b>Left click</b> in a slice view: a positive point (the structure is here); "
                "<b>Ctrl + left click</b> or <i>Negative</i> mode: a negative point; "
                "<b>Box</b> mode: drag a box around the structure. The segment updates after each click on "
                "that slice; <b>Propagate</b> re-tracks it through the volume from every corrected slice. "
                "Ctrl+Z undoes one click, box or propagation. The masking settings below apply. "
                "The engine and server are those of the Medical SAM3 module's Compute section.</html>")

    def cleanup(self) -> None:
        self._timer.stop()
        slicer.mrmlScene.RemoveObserver(self._sceneObserver)
        self._closeSession()

    # -- options ---------------------------------------------------------------------------------------
    def setupOptionsFrame(self) -> None:
        self.modeButtons = {}
        modeLayout = qt.QHBoxLayout()
        group = qt.QButtonGroup(self.scriptedEffect.optionsFrame())
        for mode, label, tip in (("positive", "Positive point", "Click where the structure is"),
                                 ("negative", "Negative point", "Click where the structure is not (or Ctrl + click)"),
                                 ("box", "Box", "Drag a box around the structure on one slice")):
            button = qt.QPushButton(label)
            button.toolTip = tip
            button.checkable = True
            group.addButton(button)
            modeLayout.addWidget(button)
            self.modeButtons[mode] = button
            button.connect("clicked()", lambda mode=mode: self._setMode(mode))
        self.scriptedEffect.addLabeledOptionsWidget("Mode:", modeLayout)

        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Re-track the segment through the volume from every corrected slice"
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        self.cancelButton.connect("clicked()", self.onCancel)
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.propagateButton)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

    def setMRMLDefaults(self) -> None:
        self.scriptedEffect.setParameterDefault("Mode", "positive")

    def updateGUIFromMRML(self) -> None:
        mode = self.scriptedEffect.parameter("Mode") if self.scriptedEffect.parameterDefined("Mode") else "positive"
        for name, button in self.modeButtons.items():
            button.checked = name == mode
        running = self._opening is not None or self._propagation is not None
        self.propagateButton.enabled = not running
        self.cancelButton.enabled = running

    def updateMRMLFromGUI(self) -> None:
        pass

    def _setMode(self, mode: str) -> None:
        self.scriptedEffect.setParameter("Mode", mode)

    def _mode(self) -> str:
        mode = self.scriptedEffect.parameter("Mode")
        return mode if mode in MODES else "positive"

    def _status(self, text: str) -> None:
        self.statusLabel.text = text

    # -- mouse -----------------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor: "vtkRenderWindowInteractor", eventId: int,
                                 viewWidget: "qMRMLAbstractViewWidget") -> bool:
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId not in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent):
            return False
        x, y = callerInteractor.GetEventPosition()
        ras = self.scriptedEffect.xyToRas(qt.QPoint(x, y), viewWidget)
        world = (ras.x(), ras.y(), ras.z())
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if self._mode() == "box":
                self._dragStart = (viewWidget, world)
                return True
            positive = self._mode() == "positive" and not callerInteractor.GetControlKey()
            self._interact(lambda segment: segment.click(world, positive))
            return True
        if self._dragStart is not None:  # release: the end of a box
            startWidget, start = self._dragStart
            self._dragStart = None
            if startWidget is viewWidget:
                self._interact(lambda segment: segment.box(start, world))
            return True
        return False

    # -- the session -----------------------------------------------------------------------------------
    def _selection(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        if parameterSetNode is None:
            return None, None, None
        return (parameterSetNode.GetSegmentationNode(), parameterSetNode.GetSelectedSegmentID(),
                parameterSetNode.GetSourceVolumeNode())

    def _interact(self, action) -> None:
        """Run ``action(InteractiveSegment)`` on the selected segment, opening a session first if needed."""
        segmentationNode, segmentId, volumeNode = self._selection()
        if segmentationNode is None or not segmentId or volumeNode is None:
            self._status("Select a segmentation, a segment and a source volume first.")
            return
        if self._propagation is not None:
            self._status("Wait for the propagation to finish (or cancel it).")
            return
        if self._workspace is None or self._volumeId != volumeNode.GetID():
            self._openSession(volumeNode, action)
            return
        self._run(action, segmentationNode, segmentId)

    def _run(self, action, segmentationNode, segmentId) -> None:
        from MedicalSAM3Core.common.errors import MedSAM3Error

        try:
            outcome = action(self._workspace.segment(segmentationNode, segmentId))
        except MedSAM3Error as error:  # a click outside the volume, the server refused, ...: the status line
            self._status(str(error))
            return
        except Exception as error:
            logging.exception("Medical SAM3: interaction")
            self._status(str(error))
            slicer.util.errorDisplay(f"Medical SAM3 could not correct the segment: {error}")
            return
        self._status(outcome.summary())

    def _openSession(self, volumeNode, then) -> None:
        from MedicalSAM3Lib.interactive import open_session

        if self._opening is not None:
            self._status("Still opening the Medical SAM3 session...")
            return
        self._closeSession()
        logic = slicer.util.getModuleLogic("MedicalSAM3")
        try:
            backend = logic.backend(logic.savedBackendSettings())
            self._opening = open_session(backend, volumeNode, logic.options())
        except Exception as error:
            self._status(str(error))
            return
        self._volumeId, self._afterOpen = volumeNode.GetID(), then
        self._status("Opening the Medical SAM3 session (the engine may have to start; the volume is sent once)...")
        self.progressBar.visible = True
        self.progressBar.setRange(0, 0)
        self._timer.start()
        self.updateGUIFromMRML()

    def _closeSession(self) -> None:
        for call in (self._opening, self._propagation):
            if call is not None:
                call.cancel()
        if self._workspace is not None:
            self._workspace.cancel()
            try:
                self._workspace.session.close()
            except Exception as error:  # the server expires it anyway
                logging.info("Medical SAM3: closing the session: %s", error)
        self._workspace = self._volumeId = self._opening = self._propagation = None

    def _onSceneClose(self, caller, event) -> None:
        self._closeSession()

    # -- propagation -----------------------------------------------------------------------------------
    def onPropagate(self) -> None:
        def start(segment):
            self._propagation = segment.start_propagation()
            self._status("Propagating...")
            self.progressBar.visible = True
            self.progressBar.setRange(0, 0)
            self._timer.start()
            self.updateGUIFromMRML()
            return _Started()

        self._interact(start)

    def onCancel(self) -> None:
        for call in (self._opening, self._propagation):
            if call is not None:
                call.cancel()
        self._status("Cancelling...")

    def _poll(self) -> None:
        from MedicalSAM3Core.common.errors import MedSAM3Error
        from MedicalSAM3Lib.interactive import Workspace

        call = self._propagation or self._opening
        if call is None:
            self._timer.stop()
            return
        if not call.poll():  # gives the background thread the GIL for a moment
            event = call.progress
            if event is not None and event.total:
                self.progressBar.setRange(0, event.total)
                self.progressBar.value = event.done
                self._status(f"{event.stage}: {event.done} / {event.total}")
            return
        self._timer.stop()
        self.progressBar.visible = False
        if call is self._opening:
            self._opening, then = None, self._afterOpen
            self._afterOpen = None
            if call.error is not None:
                self._volumeId = None
                self._status("Cancelled." if call.cancelled else f"Could not open the session: {call.error}")
            else:
                self._workspace = Workspace(call.result, slicer.mrmlScene.GetNodeByID(self._volumeId),
                                            _EffectWriter(self.scriptedEffect))
                segmentationNode, segmentId, _ = self._selection()
                if then is not None and segmentationNode is not None and segmentId:
                    self._run(then, segmentationNode, segmentId)
        else:
            self._propagation = None
            try:
                outcome = self._workspace.finish_propagation(call)
                self._status("Propagated: " + outcome.summary())
            except MedSAM3Error as error:
                self._status("Cancelled: nothing was changed." if call.cancelled else str(error))
            except Exception as error:
                logging.exception("Medical SAM3: propagation")
                self._status(str(error))
        self.updateGUIFromMRML()

    # -- effect life cycle -----------------------------------------------------------------------------
    def deactivate(self) -> None:
        self._dragStart = None


class _Started:
    """The outcome of starting a propagation (its result is written when it finishes)."""

    def summary(self) -> str:
        return "Propagating..."
