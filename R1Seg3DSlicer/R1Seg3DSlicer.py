"""R1Seg3D: ask questions about a CT in plain language and get the answer as text and segments.

Module, thin chat widget, thin Logic and a Slicer self-test. The work lives in R1Seg3DSlicerLib:
the scene in scene.py, the panel's rules in chat.py, the server the questions run in
(server_session.py, server_process.py, server_client.py, connection.py), the first-use set-up in
setup_step.py, the model card in model_card.py and the bridge to the engine (r1seg_core) in
engine.py; this file wires them to Qt and to the parameter node. Nothing heavy is imported at module
import time: torch and r1seg_core load only when the first question is sent, after the user agreed to
install what is missing.
"""

import enum
import importlib
import logging
import os
import sys
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

from R1Seg3DSlicerLib import chat, engine, events, model_picker, provenance, scene

# The Lib's modules in dependency order, for onReload (a module is reloaded after the ones it imports). The
# server modules import r1seg_core, so they are imported (and reloaded) only once a question needs them.
LIB_MODULES = ["i18n", "terminology", "scene", "dicom_export", "provenance", "chat", "events", "engine", "setup_step", "model_card",
               "process_tree", "model_picker", "connection", "server_process", "server_client", "server_session"]


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
            " as a segment of the volume's R1Seg3D segmentation."
            "<p><b>How an answer is decided.</b> Each structure the question names is decided once, and the text, the"
            " segment and the answer's record all follow from that decision:"
            "<ul><li><i>present</i>: the text names it and its volume in mL, and a segment is added;</li>"
            "<li><i>absent</i>: the text says there is no such structure in this scan, and no segment is added (the"
            " model's mask was too small for this model's presence volume, or empty);</li>"
            "<li><i>not trained</i>: the model was not trained to segment this structure, so it is not run for it,"
            " and no segment is added.</li></ul>"
            " Where the model's answer for the whole CT disagrees, the decision stands and one sentence says so."
            " Words that are not structures R1Seg3D knows never become segments: the answer says what was not"
            " understood. Several structures in one question are decided one by one."
            "<p><b>Conversation.</b> A follow-up about the last answer's structures (<i>how big is it?</i>, <i>which"
            " side is it on?</i>, <i>is it bigger than normal?</i>) is answered from the masks already found, without"
            " segmenting again, so a volume you were given does not change. A question that names another structure"
            " (<i>now the spleen</i>) segments it in the same CT. Another CT, or <i>Clear conversation</i>, starts a new"
            " conversation. On the command line, <tt>r1seg ask CT \"question\" --conversation FILE.json</tt> keeps the"
            " conversation in a file (a different CT starts a new one, and says so), and <tt>r1seg chat CT</tt> is the"
            " same conversation in a terminal, with one model load."
            "<p>The first question asks once to set up what R1Seg3D needs (PyTorch, a few Python packages, the default"
            " model's base language model), then loads the model in the background: about 20-50 s for the default"
            " model, seconds afterwards. The model runs in a separate R1Seg3D server process on this computer;"
            " <i>Cancel</i>, <i>Unload model</i>, a change of model settings and closing Slicer end that whole"
            " process. If the server cannot start, the panel shows the cause from its log and where the log is kept."
            "<p><b>Model</b> picks the model that answers: the models R1Seg3D knows (<tt>r1seg models</tt>) that answer"
            " questions, each marked installed or not. The <b>Model</b> section shows the selected one's state,"
            " download size, memory needs and licence note, as the registry states it; where the authors state no"
            " licence, it says so. An installed model is used at once (the same as choosing its folder under"
            " <i>Advanced > Model folder</i>, which stays for a folder of your own). <i>Download</i> fetches a model"
            " that is not installed: after one question that shows its size and licence note, it downloads in a"
            " separate process (<tt>r1seg models get NAME</tt>), with progress in the panel; click it again to cancel."
            " Every file is checked against its SHA-256; an interrupted or cancelled download resumes where it"
            " stopped, and a failure (offline, server unreachable, disk full) is shown as one message saying what to"
            " do. The section also shows the model's card. The default model is a small demonstration model,"
            " <b>not for clinical use</b>."
            "<p><b>Export as DICOM SEG</b> (Segments) exports the answer of the selected segment, else the latest"
            " answer, as a DICOM Segmentation through Slicer's DICOM SEG exporter (the Quantitative Reporting"
            " extension), into a folder you pick and the DICOM database. The CT must have been loaded from the DICOM"
            " database; for a CT opened from a NIfTI or NRRD file the panel says why it cannot export and what to do."
            "<p><i>Advanced > Server URL</i> sends the CT to another R1Seg3D server instead: it must be https://,"
            " unless <i>Insecure connection (trusted network only)</i> is ticked. <i>Test connection</i> checks that"
            " the server answers and speaks this panel's version. Nothing is sent anywhere unless a server URL is set."
            "<p>See the <a href='https://github.com/R1Seg3D/SlicerR1Seg3D/blob/main/R1Seg3DSlicer/README.md'>R1Seg3D"
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
        self._modelChoices = []  # model_picker.ModelChoice of the registry's answering models
        self._modelChoicesError = ""

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
        self.ui.exportDicomSegButton.connect("clicked(bool)", lambda checked: self.onExportDicomSeg())
        self.ui.modelFolderEdit.connect("currentPathChanged(QString)", self.onModelFolderEdited)
        self.ui.modelPickerCombo.connect("activated(int)", self.onModelPicked)
        self.ui.downloadButton.connect("clicked(bool)", lambda checked: self.onDownloadOrCancel())
        self.ui.downloadProgressBar.visible = False
        self.downloadTimer = qt.QTimer()
        self.downloadTimer.setInterval(self.POLL_INTERVAL_MS)
        self.downloadTimer.connect("timeout()", self.onPollDownload)
        self.ui.clearButton.connect("clicked(bool)", lambda checked: self.onClearConversation())
        self.ui.unloadButton.connect("clicked(bool)", lambda checked: self.onUnloadModel())
        self.ui.testConnectionButton.connect("clicked(bool)", lambda checked: self.onTestConnection())
        # The model card follows the model that answers: the folder here, or the server named in Advanced.
        self.ui.serverUrlEdit.connect("editingFinished()", self.refreshModelCard)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollQuestion)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.initializeParameterNode()
        self.refreshModelCard()
        self.refresh()
        self.refreshModelChoices()

    def cleanup(self) -> None:
        self.pollTimer.stop()
        self.downloadTimer.stop()
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
        self.showPickedModel()
        self.refresh()

    def onModelFolderEdited(self, path) -> None:
        if self._parameterNode and self._parameterNode.modelFolder != path:
            self._parameterNode.modelFolder = path
        self.refreshModelCard()

    # ---- model picker ----------------------------------------------------------------------

    def refreshModelChoices(self) -> None:
        """List the registry's models that answer questions, each with its installed state."""
        try:
            self._modelChoices = self.logic.modelChoices()
        except model_picker.ModelListError as error:  # no engine yet: the picker says why, the folder setting works
            logging.warning("R1Seg3D could not list the models: %s", error)
            self._modelChoices = []
            self._modelChoicesError = str(error)
        else:
            self._modelChoicesError = ""
        combo = self.ui.modelPickerCombo
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in self._modelChoices:
            state = _("installed") if choice.installed else _("not installed")
            combo.addItem(f"{choice.title} ({state})", choice.name)
        combo.addItem(_("Custom folder (Advanced > Model folder)"), model_picker.CUSTOM_FOLDER)
        combo.blockSignals(wasBlocked)
        self.showPickedModel()

    def pickedModel(self):
        """The picker's selected model (model_picker.ModelChoice), or None for the custom folder."""
        name = self.ui.modelPickerCombo.currentData
        return next((choice for choice in self._modelChoices if choice.name == name), None)

    def showPickedModel(self) -> None:
        """Select the picker's item for the model-folder setting and show its details; the Download button follows."""
        folder = self._parameterNode.modelFolder if self._parameterNode else ""
        combo = self.ui.modelPickerCombo
        if not self.logic.downloading:   # while downloading, the picker keeps showing the model being fetched
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = max(combo.findData(model_picker.choice_for_folder(self._modelChoices, folder)), 0)
            combo.blockSignals(wasBlocked)
        self.showModelDetails()

    def onModelPicked(self, index) -> None:
        choice = self.pickedModel()
        if choice is not None and choice.folder_setting is not None and self._parameterNode:
            self._parameterNode.modelFolder = choice.folder_setting   # an installed model: its folder answers
        self.showModelDetails()

    def showModelDetails(self) -> None:
        choice = self.pickedModel()
        if choice is not None:
            text = model_picker.details_text(choice)
        elif self._modelChoicesError:
            text = self._modelChoicesError
        else:
            text = _("A model folder of your own (Advanced > Model folder).")
        self.ui.modelChoiceLabel.text = text
        self.ui.modelPickerCombo.toolTip = text
        downloading = self.logic.downloading
        self.ui.downloadButton.text = _("Cancel download") if downloading else _("Download")
        self.ui.downloadButton.enabled = downloading or (choice is not None and not choice.installed)
        self.ui.modelPickerCombo.enabled = not downloading

    def onDownloadOrCancel(self) -> None:
        if self.logic.downloading:
            self.logic.cancelDownload()
            return
        choice = self.pickedModel()
        if choice is None or choice.installed:
            return
        try:
            started = self.logic.startModelDownload(
                choice, lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Download a model")))
        except Exception as error:
            logging.exception("R1Seg3D could not start the download")
            self.showNotice(engine.describe_error(error))
            return
        if started:
            self.ui.downloadProgressBar.setRange(0, 0)   # busy until the first bytes arrive
            self.ui.downloadProgressBar.visible = True
            self.showNotice(_("Starting the download of {name}…").format(name=choice.name))
            self.downloadTimer.start()
        self.showModelDetails()

    def onPollDownload(self) -> None:
        for event in self.logic.pollDownload():
            if isinstance(event, model_picker.DownloadProgress):
                if event.fraction is not None:
                    self.ui.downloadProgressBar.setRange(0, 1000)
                    self.ui.downloadProgressBar.value = int(event.fraction * 1000)
                self.showNotice(event.text())
            elif isinstance(event, model_picker.DownloadFinished):
                self.showNotice(_("Installed in {folder}; the next question uses it.").format(folder=event.folder))
                if self._parameterNode:
                    self._parameterNode.modelFolder = event.folder
            else:   # failed or cancelled: the command's own message
                self.showNotice(event.message)
        if not self.logic.downloading:
            self.downloadTimer.stop()
            self.ui.downloadProgressBar.visible = False
            self.refreshModelChoices()

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
        notReady = self.logic.setUp(interactive=True)
        if notReady:
            self.showNotice(notReady)
            return
        self._notice = ""

        self.chat.send(question, volumeNode.GetName())
        self.ui.questionEdit.clear()
        self._questionVolumeNodeId = volumeNode.GetID()
        # Kept for the error message and the provenance record: the settings may change while the question runs.
        self._questionOptions = self.logic.askOptions(self._parameterNode)
        try:
            self.useServerSettings()
            self.logic.startQuestion(volumeNode, question, self._questionOptions)
        except Exception as error:
            logging.exception("R1Seg3D could not start the question")
            self.chat.fail(engine.describe_error(error, self._questionOptions))
        else:
            self.pollTimer.start()

    def useServerSettings(self) -> None:
        """Hand the Advanced section's server settings to the Logic (raises when the URL is not allowed)."""
        self.logic.setRemoteServer(self.ui.serverUrlEdit.text, self.ui.tokenEdit.text,
                                   self.ui.insecureCheckBox.checked)

    def onPollQuestion(self) -> None:
        for event in self.logic.pollEvents():
            if isinstance(event, events.ProgressEvent):
                self.chat.report_progress(event.done, event.total, event.stage)
            elif isinstance(event, events.FinishedEvent) and self.chat.state is chat.ChatState.CANCELLING:
                self.chat.mark_cancelled()  # Cancel was clicked after the answer came in: add nothing
            elif isinstance(event, events.FinishedEvent):
                self._writeAnswer(event.result)
            elif isinstance(event, events.FailedEvent):
                logging.error("R1Seg3D question failed: %s\n%s", event.error, event.traceback_text)
                self.chat.fail(engine.describe_error(event.error, self._questionOptions))
            elif isinstance(event, events.CancelledEvent):
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

    def onExportDicomSeg(self) -> None:
        """Export the answer the provenance panel shows as DICOM SEG, into a folder the user picks and Slicer's DICOM
        database; when it cannot be, the status line says why and what to do."""
        records, record = self.shownRecord()
        if record is None:
            self.showNotice(_("Select a segment an R1Seg3D answer made (or ask a question) to export its answer."))
            return
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Export the answer as DICOM SEG into"))
        if not folder:
            return
        volumeNode = self._parameterNode.inputVolume if self._parameterNode else None
        try:
            with slicer.util.WaitCursor():
                path = self.logic.exportDicomSeg(volumeNode, self.ui.segmentsTable.segmentationNode(), record, folder)
        except Exception as error:
            logging.warning("R1Seg3D DICOM SEG export: %s", error)
            self.showNotice(engine.describe_error(error))
            return
        self.showNotice(_("Exported as DICOM SEG: {path} (also added to the DICOM database).").format(path=path))

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

    def onTestConnection(self) -> None:
        """Ask the server in use for its health and version; the answer (or what is wrong) goes to the status line."""
        try:
            self.useServerSettings()
            self.showNotice(self.logic.testConnection())
        except Exception as error:
            logging.warning("R1Seg3D connection test: %s", error)
            self.showNotice(engine.describe_error(error))
        self.refreshModelCard()

    def refreshModelCard(self) -> None:
        """Show the card of the model that answers, its licence and, where the card says so, the caveat."""
        options = self.logic.askOptions(self._parameterNode) if self._parameterNode else engine.AskOptions()
        try:
            self.useServerSettings()
            card = self.logic.modelCard(options)
        except Exception as error:  # no engine yet, an unreachable server: say so in the section, not in a popup
            self.ui.modelSummaryLabel.text = _("The model card cannot be shown: {error}").format(
                error=engine.describe_error(error))
            self.ui.modelCaveatLabel.visible = False
            return
        self.ui.modelSummaryLabel.text = _("{name}. Licence: {licence}. Source: {source}").format(
            name=card.name, licence=card.licence, source=card.source)
        self.ui.modelCaveatLabel.text = f"<b>{card.caveat}</b>" if card.caveat else ""
        self.ui.modelCaveatLabel.visible = bool(card.caveat)
        self.ui.modelCardView.setMarkdown(card.text)

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
        self.ui.exportDicomSegButton.enabled = segmentationNode is not None
        self.refreshProvenance()

    def shownRecord(self):
        """(records of the shown segmentation, the record of the answer that made the selected segment, else of the
        latest answer; None for a segment no answer made)."""
        segmentationNode = self.ui.segmentsTable.segmentationNode()
        records = provenance.records(segmentationNode) if segmentationNode is not None else []
        selected = list(self.ui.segmentsTable.selectedSegmentIDs()) if records else []
        if not records:
            return records, None
        return records, provenance.record_for_segment(segmentationNode, selected[0]) if selected else records[-1]

    def refreshProvenance(self) -> None:
        """The record of the answer that made the selected segment, else of the latest answer."""
        records, record = self.shownRecord()
        if not records:
            text = _("No answer has added segments to this CT yet.")
        else:
            text = provenance.describe(record) if record is not None else _(
                "No R1Seg3D answer made this segment (it was added by hand or by another module).")
        if text != self.ui.provenanceView.toPlainText():  # the timer redraws often; keep the user's scroll position
            self.ui.provenanceView.setPlainText(text)


class R1Seg3DSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console and scripts without the widget.

    Blocking use (scripts):  logic.process(volumeNode, "segment the liver")  -- the model runs in this process
    Panel use:               logic.startQuestion(...), then logic.pollEvents() from a timer -- the model runs in an
                             R1Seg3D server process (issue #13: a Python thread inside Slicer is starved of the
                             interpreter lock), started and ended by `servers` (server_session.ServerSession).
    """

    def __init__(self, session=None, servers=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = session or engine.R1SegSession()   # reads volumes, writes answers, runs `process`
        self._servers = servers
        self._download = None   # model_picker.ModelDownload while a model downloads

    @property
    def servers(self):
        """The server side of the panel, created on first use (it imports r1seg_core, which may not be set up)."""
        if self._servers is None:
            from R1Seg3DSlicerLib import server_session

            self._servers = server_session.ServerSession()
        return self._servers

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

    # ---- first use -----------------------------------------------------------------------------------------

    def setUp(self, interactive: bool = True):
        """None when the engine can run; else why not, as a message for the panel. What is missing is installed
        only after one consent that lists all of it (setup_step.py), never at import, never silently."""
        from R1Seg3DSlicerLib import setup_step

        problems = setup_step.blocking_problems((slicer.app.majorVersion, slicer.app.minorVersion))
        if problems:
            return "\n\n".join(problems)
        plan = setup_step.setup_plan()
        if plan.empty:
            return None
        if not interactive or not slicer.util.confirmOkCancelDisplay(plan.consent_text(), windowTitle=_("R1Seg3D set-up")):
            return _("R1Seg3D cannot answer until it is set up; the next question asks again.")
        return setup_step.run_setup(plan)

    # ---- models --------------------------------------------------------------------------------------------

    @staticmethod
    def modelChoices() -> list:
        """The registry's models that answer questions (model_picker.ModelChoice), each with its installed state."""
        return model_picker.model_choices()

    def startModelDownload(self, choice, confirm) -> bool:
        """Download `choice` in a process of its own once `confirm(text)` agrees to its size and licence note
        (model_picker.consent_text); False when declined. `pollDownload` from a timer then follows it."""
        if self.downloading:
            raise RuntimeError(_("A model is already downloading; wait for it or cancel it."))
        if not confirm(model_picker.consent_text(choice)):
            return False
        self._download = model_picker.ModelDownload(choice.name)
        self._download.start()
        return True

    @property
    def downloading(self) -> bool:
        return self._download is not None and self._download.running

    def pollDownload(self) -> list:
        """New events of the download: progress, then finished, failed or cancelled."""
        return self._download.poll() if self._download is not None else []

    def cancelDownload(self) -> None:
        if self._download is not None:
            self._download.cancel()

    # ---- DICOM SEG -----------------------------------------------------------------------------------------

    def exportDicomSeg(self, volumeNode, segmentationNode, record, folder: str) -> str:
        """Export the answer of provenance `record` as a DICOM Segmentation through Slicer's exporter (the
        DICOMSegmentationPlugin of Quantitative Reporting), into `folder` and the DICOM database; returns the file.
        Raises dicom_export.ExportRefused saying why when it cannot be exported (dicom_export.py decides)."""
        import glob

        from R1Seg3DSlicerLib import dicom_export

        database = slicer.dicomDatabase
        export = dicom_export.check_exportable(volumeNode, segmentationNode, record.segment_ids,
                                               database.fileForInstance if database else lambda uid: "")
        try:
            import DICOMSegmentationPlugin
        except ImportError as error:
            raise dicom_export.ExportRefused(_(
                "DICOM SEG export needs Slicer's DICOM SEG exporter, which comes with the Quantitative Reporting"
                " extension: install it from the Extensions Manager, restart Slicer and export again.")) from error
        node = dicom_export.build_export_segmentation(
            export, slicer.mrmlScene, _("{volume} R1Seg3D answer").format(volume=volumeNode.GetName()),
            f"R1Seg3D {record.model_name}".strip())
        before = set(glob.glob(os.path.join(folder, "*.dcm")))
        try:
            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
            exportables = exporter.examineForExport(hierarchy.GetItemByDataNode(node))
            if not exportables:
                raise dicom_export.ExportRefused(_("Slicer's DICOM SEG exporter refused the answer: the CT's DICOM files"
                                                   " are not all in the DICOM database. ") + dicom_export.LOAD_FROM_DICOM)
            for exportable in exportables:
                exportable.directory = folder
                exportable.setTag("SeriesDescription", f"R1Seg3D: {record.question}"[:64])   # LO: 64 characters
            failure = exporter.export(exportables)
        finally:
            slicer.mrmlScene.RemoveNode(node)
        if failure:
            raise RuntimeError(_("Slicer's DICOM SEG exporter failed: {failure}").format(failure=failure))
        written = sorted(set(glob.glob(os.path.join(folder, "*.dcm"))) - before)
        return written[-1] if written else folder

    # ---- questions -----------------------------------------------------------------------------------------

    def process(self, volumeNode, question: str, options: engine.AskOptions = engine.AskOptions(), progress=None):
        """Ask and write, blocking, with the model on this thread; the answer's provenance record is stored with
        its segments. Returns (result, change, targets)."""
        return self.session.process(volumeNode, question, options, progress=progress, record=True)

    def setRemoteServer(self, url: str = "", token: str = "", allowInsecure: bool = False) -> None:
        """Use a running `r1seg serve` at `url`; an empty url means a local server started here. A non-loopback
        url must be https unless `allowInsecure` (the user said the network is trusted)."""
        self.servers.set_remote(url, token, allowInsecure)

    def startQuestion(self, volumeNode, question: str, options: engine.AskOptions) -> int:
        """Read the volume here (main thread) and send the question to the server; returns at once. `pollEvents`
        from a timer advances it."""
        volume = self.session.volume_from_node(volumeNode)
        return self.servers.start_question(volume, volumeNode.GetID(), question, options)

    def pollEvents(self) -> list:
        return self.servers.poll() if self._servers is not None else []

    @property
    def busy(self) -> bool:
        return self._servers is not None and self._servers.busy

    def cancel(self) -> None:
        if self._servers is not None:
            self._servers.cancel()

    def testConnection(self) -> str:
        """A line saying who answers and that its version fits (raises the server's error otherwise)."""
        return self.servers.describe_connection()

    def modelCard(self, options: engine.AskOptions):
        """The card of the model that answers (model_card.ModelCard): the remote server's, else the folder's."""
        return self.servers.model_card(options.model_dir)

    def unloadModel(self) -> None:
        """Free the model's memory: end the local server's process tree, or ask a remote one to unload; a model
        loaded here by the blocking `process` is dropped too."""
        if self._servers is not None:
            self._servers.unload()
        self.session.unload_model()

    def answerRecord(self, volumeNode, question: str, result, options: engine.AskOptions, elapsedSeconds: float):
        """The provenance record of an answer (provenance.py). A remote server's model folder is not readable
        here: the record names the server instead, without a config hash."""
        remote = self._servers.remote_url if self._servers is not None else None
        model = (remote, _("remote R1Seg3D server"), "") if remote else None
        return engine.answer_record(volumeNode, question, result, options, elapsedSeconds, model)

    def writeAnswer(self, volumeNode, result, record=None):
        """Write the answer's segments, and its provenance record when given; returns (change, found targets)."""
        return self.session.write_answer(volumeNode, result, record)

    def clearConversation(self) -> None:
        """Start over: the next question about any volume opens a new conversation, here and on the server, where
        the old conversations are forgotten (follow-ups must not see the cleared turns)."""
        self.session.clear_conversation()
        if self._servers is not None:
            self._servers.clear_conversations()

    def releaseScene(self) -> None:
        """The scene closes: drop its question, its conversations and the CTs sent from it, here and on the server.
        The model stays loaded for the next scene (Unload model frees it)."""
        if self._servers is not None:
            self._servers.drop_question()   # its events would be about nodes that are gone
        self.clearConversation()
        if self._servers is not None:
            self._servers.release_volumes()

    def shutdown(self) -> None:
        if self.downloading:   # ended with Slicer; the next Download resumes it
            self.cancelDownload()
            self.pollDownload()   # collects the ended process and removes its files
        if self._servers is not None:
            self._servers.shutdown()


class R1Seg3DSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or CTest). The blocking path uses a scripted stand-in for the model:
    factory machines have no GPU and no weights, and the point there is the scene. The panel's path starts a real
    server process through PythonSlicer, one that cannot start, and checks that the panel can say why; the model
    picker lists the registry through PythonSlicer too."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnswerBecomesSegments()
        self.setUp()
        self.test_ServerStartFailureIsExplained()
        self.setUp()
        self.test_ModelPickerListsTheRegistry()

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

    def test_ModelPickerListsTheRegistry(self):
        """The picker's list comes from the engine's Python started through PythonSlicer, as the server does."""
        choices = R1Seg3DSlicerLogic.modelChoices()
        default = next(choice for choice in choices if choice.bundled)
        self.assertTrue(default.installed)
        self.assertEqual(default.folder_setting, "")
        self.assertEqual(model_picker.choice_for_folder(choices, "/no/such/model"), model_picker.CUSTOM_FOLDER)

    def test_ServerStartFailureIsExplained(self):
        import time
        from pathlib import Path

        from R1Seg3DSlicerLib import server_process, server_session

        # A server command line it refuses: the real server process starts, fails and exits.
        def refusedServer(*key):
            server = server_process.LocalServer(*key)
            server._arguments.append("--no-such-option")
            return server

        volumeNode = self._obliqueVolume()
        logic = R1Seg3DSlicerLogic(servers=server_session.ServerSession(server_factory=refusedServer))
        try:
            logic.startQuestion(volumeNode, "segment the liver", engine.AskOptions(device="cpu"))
            deadline = time.monotonic() + 120.0
            seen = []
            while not any(isinstance(e, events.TERMINAL_EVENTS) for e in seen) and time.monotonic() < deadline:
                slicer.app.processEvents()
                seen += logic.pollEvents()
                time.sleep(0.05)
            self.assertIsInstance(seen[-1], events.FailedEvent)
            message = engine.describe_error(seen[-1].error)
            self.assertIn("could not start", message)
            self.assertIn("--no-such-option", message)
            log = Path(seen[-1].error.log_path)
            self.assertTrue(log.is_file())   # kept for the user
            log.unlink()
            self.assertIsNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode"))
        finally:
            logic.shutdown()
