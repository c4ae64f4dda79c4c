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

All scene logic is in :mod:`MedicalSAM3Lib.interactive` and :mod:`MedicalSAM3Lib.overlay` (tested on
slicer-core). This file only turns mouse events into their calls, polls with a ``QTimer`` and owns the
marker actors. The engine runs in the module's backend (the local engine process or a remote server,
chosen in the module's Compute section) as a ``RemoteSession``.

* **Nothing blocks the GUI.** Opening the session (the engine may have to start; the volume is uploaded),
  every click and box, and Propagate are engine calls in a background thread
  (:class:`~MedicalSAM3Lib.interactive.InteractionQueue`): queued in order, one at a time, "Working..."
  meanwhile; the answer is written on the GUI thread, one undo step per interaction. (A click is usually
  answered in tens of milliseconds, but the first click on a slice computes its features: tens of
  seconds on a CPU with a full-size model.)
* **Preparing slices** (option, on by default): when the mouse rests on a slice of an open session
  (:data:`~MedicalSAM3Lib.interactive.PREPARE_DELAY_S`), the engine computes that slice's features in the
  background, once per slice, only when nothing else is queued, so that the first click there is fast.
* **Markers.** The selected segment's clicks (green positive, red negative) and boxes that the engine
  holds are drawn on every slice view showing their slice, faint while unanswered, and a rubber band
  while a box is dragged; as Slicer's Draw and Paint effects do, with ``vtkActor2D`` s added by
  ``addActor2D`` (no scene nodes: nothing to save, undo or delete, and markups placement is not
  disturbed). They follow Ctrl+Z (the engine's state), a segment painted otherwise hides them (the engine
  forgets them at the next click), propagation keeps them (the engine keeps them), and another segment or
  source volume shows its own (none for a volume without a session).

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
CHECK_MS = 150  # the segmentation changed (Ctrl+Z?): check once it is quiet
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
        self._queue = None  # MedicalSAM3Lib.interactive.InteractionQueue of the open session
        self._volumeId = None  # the source volume the session was opened on
        self._opening = None  # BackgroundCall opening a session
        self._afterOpen = []  # what to do once the session is open (clicks made while it opens)
        self._dragStart = None  # (view widget, world position) of a box being dragged
        self._dragEnd = None  # world position of its other corner, while dragging
        self._lastXy = {}  # view widget -> the mouse's last position there (to prepare after a slice change)
        self._overlays = {}  # slice widget -> (actor, poly data) of its markers
        self._observed = None  # (vtkSegmentation, observer tags)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._poll)
        self._checkTimer = qt.QTimer()
        self._checkTimer.setInterval(CHECK_MS)
        self._checkTimer.singleShot = True
        self._checkTimer.connect("timeout()", self._onSegmentationChecked)
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
                "<b>Left click</b> in a slice view: a positive point (the structure is here, green); "
                "<b>Ctrl + left click</b> or <i>Negative</i> mode: a negative point (red); "
                "<b>Box</b> mode: drag a box around the structure. The segment updates after each click on "
                "that slice (clicks are queued while the engine works); <b>Propagate</b> re-tracks it through "
                "the volume from every corrected slice. Ctrl+Z undoes one click, box or propagation. The "
                "masking settings below apply. The engine and server are those of the Medical SAM3 "
                "module's Compute section.</html>")

    def cleanup(self) -> None:
        self._timer.stop()
        self._checkTimer.stop()
        slicer.mrmlScene.RemoveObserver(self._sceneObserver)
        self._observeSegmentation(False)
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

        self.prepareCheckBox = qt.QCheckBox("Prepare the slice under the mouse")
        self.prepareCheckBox.toolTip = ("While the mouse rests on a slice, the engine computes that slice's "
                                        "features in the background, so that the first click there is fast")
        self.prepareCheckBox.connect("toggled(bool)", self._setPrepare)
        self.scriptedEffect.addOptionsWidget(self.prepareCheckBox)

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
        self.scriptedEffect.setParameterDefault("PrepareSlices", "1")

    def updateGUIFromMRML(self) -> None:
        mode = self.scriptedEffect.parameter("Mode") if self.scriptedEffect.parameterDefined("Mode") else "positive"
        for name, button in self.modeButtons.items():
            button.checked = name == mode
        wasBlocked = self.prepareCheckBox.blockSignals(True)
        self.prepareCheckBox.checked = self._prepareEnabled()
        self.prepareCheckBox.blockSignals(wasBlocked)
        running = self._opening is not None or (self._queue is not None and self._queue.working)
        self.propagateButton.enabled = not (self._queue is not None and self._queue.propagating)
        self.cancelButton.enabled = running
        if self.scriptedEffect.active():  # the segmentation or segment may have changed
            self._observeSegmentation(True)
            self._refreshMarkers()

    def updateMRMLFromGUI(self) -> None:
        pass

    def _setMode(self, mode: str) -> None:
        self.scriptedEffect.setParameter("Mode", mode)

    def _mode(self) -> str:
        mode = self.scriptedEffect.parameter("Mode")
        return mode if mode in MODES else "positive"

    def _prepareEnabled(self) -> bool:
        return (not self.scriptedEffect.parameterDefined("PrepareSlices")
                or self.scriptedEffect.parameter("PrepareSlices") != "0")

    def _setPrepare(self, enabled: bool) -> None:
        self.scriptedEffect.setParameter("PrepareSlices", "1" if enabled else "0")
        if self._queue is not None:
            self._queue.prepare_enabled = bool(enabled)

    def _status(self, text: str) -> None:
        self.statusLabel.text = text

    # -- mouse -----------------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor: "vtkRenderWindowInteractor", eventId: int,
                                 viewWidget: "qMRMLAbstractViewWidget") -> bool:
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            x, y = callerInteractor.GetEventPosition()
            self._lastXy[viewWidget] = (x, y)
            ras = self.scriptedEffect.xyToRas(qt.QPoint(x, y), viewWidget)
            world = (ras.x(), ras.y(), ras.z())
            self._hover(world)
            if self._dragStart is not None and self._dragStart[0] is viewWidget:
                self._dragEnd = world
                self._refreshMarkers([viewWidget])
                return True
            return False
        if eventId not in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent):
            return False
        x, y = callerInteractor.GetEventPosition()
        ras = self.scriptedEffect.xyToRas(qt.QPoint(x, y), viewWidget)
        world = (ras.x(), ras.y(), ras.z())
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if self._mode() == "box":
                self._dragStart, self._dragEnd = (viewWidget, world), world
                self._refreshMarkers([viewWidget])
                return True
            positive = self._mode() == "positive" and not callerInteractor.GetControlKey()
            self._interact(lambda queue, node, segmentId: queue.click(node, segmentId, world, positive))
            return True
        if self._dragStart is not None:  # release: the end of a box
            startWidget, start = self._dragStart
            self._dragStart = self._dragEnd = None
            if startWidget is viewWidget:
                self._interact(lambda queue, node, segmentId: queue.box(node, segmentId, start, world))
            self._refreshMarkers([startWidget])
            return True
        return False

    def processViewNodeEvents(self, callerViewNode, eventId: int, viewWidget: "qMRMLAbstractViewWidget") -> None:
        """The slice moved (scrolled, panned, zoomed): redraw its markers; prepare the slice now under the mouse."""
        if viewWidget.className() != "qMRMLSliceWidget":
            return
        if viewWidget in self._lastXy:
            x, y = self._lastXy[viewWidget]
            ras = self.scriptedEffect.xyToRas(qt.QPoint(x, y), viewWidget)
            self._hover((ras.x(), ras.y(), ras.z()))
        self._refreshMarkers([viewWidget])

    def _hover(self, world) -> None:
        queue = self._queue
        if queue is None or not queue.prepare_enabled:
            return
        segmentationNode, segmentId, volumeNode = self._selection()
        if volumeNode is None or volumeNode.GetID() != self._volumeId:
            return
        queue.hover(world, segmentationNode, segmentId)
        if queue.active and not self._timer.isActive():
            self._timer.start()

    # -- the session -----------------------------------------------------------------------------------
    def _selection(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        if parameterSetNode is None:
            return None, None, None
        return (parameterSetNode.GetSegmentationNode(), parameterSetNode.GetSelectedSegmentID(),
                parameterSetNode.GetSourceVolumeNode())

    def _interact(self, ask) -> None:
        """Queue ``ask(queue, segmentation node, segment id)`` on the selected segment, opening a session first
        if needed; never waits for the engine."""
        segmentationNode, segmentId, volumeNode = self._selection()
        if segmentationNode is None or not segmentId or volumeNode is None:
            self._status("Select a segmentation, a segment and a source volume first.")
            return
        if self._queue is None or self._volumeId != volumeNode.GetID():
            self._openSession(volumeNode, ask)
            return
        self._ask(ask, segmentationNode, segmentId)

    def _ask(self, ask, segmentationNode, segmentId) -> None:
        from MedicalSAM3Core.common.errors import MedSAM3Error

        try:
            ask(self._queue, segmentationNode, segmentId)
        except MedSAM3Error as error:  # a click outside the volume, during a propagation: the status line
            self._status(str(error))
            return
        except Exception as error:
            logging.exception("Medical SAM3: interaction")
            self._status(str(error))
            return
        self._showWorking()
        self._refreshMarkers()
        self._timer.start()

    def _showWorking(self) -> None:
        queue = self._queue
        if queue is None or not queue.working:
            return
        if queue.propagating:
            self._status("Propagating...")
            self.progressBar.visible = True
            if queue.progress is None:
                self.progressBar.setRange(0, 0)
        else:
            waiting = queue.queued
            self._status("Working..." + (f" ({waiting} more queued)" if waiting else ""))
        self.updateGUIFromMRML()

    def _openSession(self, volumeNode, then) -> None:
        from MedicalSAM3Lib.interactive import open_session

        if self._opening is not None:
            if self._volumeId == volumeNode.GetID():
                self._afterOpen.append(then)  # kept in order, asked once the session is open
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
        self._volumeId, self._afterOpen = volumeNode.GetID(), [then]
        self._status("Opening the Medical SAM3 session (the engine may have to start; the volume is sent once)...")
        self.progressBar.visible = True
        self.progressBar.setRange(0, 0)
        self._timer.start()
        self.updateGUIFromMRML()

    def _closeSession(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        queue = self._queue
        self._queue = self._volumeId = self._opening = None
        self._afterOpen = []
        if queue is not None:
            queue.close()
            try:
                queue.workspace.session.close()
            except Exception as error:  # the server expires it anyway
                logging.info("Medical SAM3: closing the session: %s", error)
        self._refreshMarkers()

    def _onSceneClose(self, caller, event) -> None:
        self._observeSegmentation(False)
        self._closeSession()

    # -- propagation -----------------------------------------------------------------------------------
    def onPropagate(self) -> None:
        self._interact(lambda queue, node, segmentId: queue.propagate(node, segmentId))

    def onCancel(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._queue is not None:
            self._queue.cancel()
        self._status("Cancelling...")
        self._refreshMarkers()

    # -- the timer -------------------------------------------------------------------------------------
    def _poll(self) -> None:
        if self._opening is not None:
            self._pollOpening()
            return
        queue = self._queue
        if queue is None:
            self._timer.stop()
            return
        wasWorking = queue.working
        events = queue.poll()  # gives the background thread the GIL for a moment; writes finished answers
        for event in events:
            self._report(event)
        if queue.working:
            event = queue.progress
            if event is not None and event.total:
                self.progressBar.visible = True
                self.progressBar.setRange(0, event.total)
                self.progressBar.value = event.done
                self._status(f"{event.stage}: {event.done} / {event.total}")
            elif events:
                self._showWorking()
        elif wasWorking:
            self.progressBar.visible = False
            self.updateGUIFromMRML()
        if events or wasWorking != queue.working:
            self._refreshMarkers()
        if not queue.active:
            self._timer.stop()

    def _report(self, event) -> None:
        from MedicalSAM3Core.common.errors import MedSAM3Error

        propagation = event.request is not None and event.request.kind == "propagate"
        if event.error is None:
            self._status(("Propagated: " if propagation else "") + event.outcome.summary())
        elif event.cancelled:
            self._status("Cancelled: nothing was changed.")
        elif isinstance(event.error, MedSAM3Error):
            self._status(str(event.error))
        else:
            logging.error("Medical SAM3: %s", event.error)
            self._status(str(event.error))

    def _pollOpening(self) -> None:
        from MedicalSAM3Lib.interactive import InteractionQueue, Workspace

        call = self._opening
        if not call.poll():
            return
        self.progressBar.visible = False
        self._opening, then = None, self._afterOpen
        self._afterOpen = []
        if call.error is not None:
            self._volumeId = None
            self._timer.stop()
            self._status("Cancelled." if call.cancelled else f"Could not open the session: {call.error}")
            self.updateGUIFromMRML()
            return
        workspace = Workspace(call.result, slicer.mrmlScene.GetNodeByID(self._volumeId),
                              _EffectWriter(self.scriptedEffect))
        self._queue = InteractionQueue(workspace, prepare=self._prepareEnabled())
        self._status("")
        segmentationNode, segmentId, _ = self._selection()
        if segmentationNode is not None and segmentId:
            for ask in then:
                self._ask(ask, segmentationNode, segmentId)
        self.updateGUIFromMRML()

    # -- Ctrl+Z and other changes of the segmentation ----------------------------------------------------
    def _observeSegmentation(self, enabled: bool) -> None:
        segmentationNode, _, _ = self._selection() if enabled else (None, None, None)
        segmentation = segmentationNode.GetSegmentation() if segmentationNode is not None else None
        if self._observed is not None and self._observed[0] is segmentation:
            return
        if self._observed is not None:
            observed, tags = self._observed
            for tag in tags:
                observed.RemoveObserver(tag)
            self._observed = None
        if segmentation is not None:
            events = (slicer.vtkSegmentation.SourceRepresentationModified, slicer.vtkSegmentation.SegmentModified,
                      slicer.vtkSegmentation.SegmentRemoved)
            self._observed = (segmentation, [segmentation.AddObserver(event, self._onSegmentationModified)
                                             for event in events])

    def _onSegmentationModified(self, caller, event) -> None:
        if self._queue is not None:
            self._checkTimer.start()  # restarts: one check once the edits (or the undo) are done

    def _onSegmentationChecked(self) -> None:
        queue = self._queue
        if queue is None:
            return
        try:
            queue.check()
        except Exception as error:
            logging.exception("Medical SAM3: checking the segmentation")
            self._status(str(error))
        if queue.active:
            self._timer.start()
        self._refreshMarkers()

    # -- markers ---------------------------------------------------------------------------------------
    def _sliceWidgets(self) -> list:
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return []
        widgets = [layoutManager.sliceWidget(name) for name in layoutManager.sliceViewNames()]
        return [widget for widget in widgets if widget is not None]

    def _overlay(self, sliceWidget):
        if sliceWidget not in self._overlays:
            polyData = vtk.vtkPolyData()
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(polyData)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetLineWidth(2)
            self.scriptedEffect.addActor2D(sliceWidget, actor)
            self._overlays[sliceWidget] = (actor, polyData)
        return self._overlays[sliceWidget]

    def _refreshMarkers(self, sliceWidgets=None) -> None:
        """Redraw the markers of the selected segment (and the rubber band) in ``sliceWidgets`` (default: all)."""
        from MedicalSAM3Lib.overlay import fill_polydata, view_shapes

        if not self.scriptedEffect.active():
            return
        segmentationNode, segmentId, volumeNode = self._selection()
        queue = self._queue
        prompts = ()
        if (queue is not None and segmentationNode is not None and segmentId and volumeNode is not None
                and volumeNode.GetID() == self._volumeId):
            prompts = queue.prompts(segmentationNode, segmentId)
        axis = queue.workspace.axis if queue is not None else 0
        for sliceWidget in (self._sliceWidgets() if sliceWidgets is None else sliceWidgets):
            band = None
            if self._dragStart is not None and self._dragStart[0] is sliceWidget and volumeNode is not None:
                band = (self._dragStart[1], self._dragEnd)
            if not prompts and band is None and sliceWidget not in self._overlays:
                continue
            try:
                shapes = view_shapes(prompts, volumeNode, sliceWidget.mrmlSliceNode(), axis, band)
            except Exception as error:  # a volume without image data, a singular slice matrix: no markers
                logging.debug("Medical SAM3: markers: %s", error)
                shapes = []
            _, polyData = self._overlay(sliceWidget)
            fill_polydata(polyData, shapes)
            sliceWidget.sliceView().scheduleRender()

    def _removeMarkers(self) -> None:
        for sliceWidget, (actor, _) in self._overlays.items():
            self.scriptedEffect.removeActor2D(sliceWidget, actor)
        self._overlays = {}

    # -- effect life cycle -----------------------------------------------------------------------------
    def activate(self) -> None:
        self._observeSegmentation(True)
        self._refreshMarkers()

    def deactivate(self) -> None:
        self._dragStart = self._dragEnd = None
        self._lastXy = {}
        self._observeSegmentation(False)
        self._removeMarkers()
