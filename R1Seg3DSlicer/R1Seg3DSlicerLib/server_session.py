"""The panel's one way to run a question: an R1Seg3D server process, local or remote.

ServerSession owns the local `r1seg serve` process (server_process.LocalServer: started on the first
question, reused, replaced when the model settings change, ended as a whole tree by Stop, Unload and
shutdown) or the client of a remote server the user named, plus what that server holds for this panel
(one conversation per volume, the CTs sent). The question in flight is a server_client.ServerQuestion,
advanced by `poll()` from the panel's timer. Plain Python (no Slicer), so it is tested alone.
"""
from __future__ import annotations

import logging

from r1seg_core.server.client import ServerError

from . import connection, model_card, server_client, server_process
from .i18n import tr as _


class ServerSession:
    def __init__(self, server_factory=server_process.LocalServer):
        self._server_factory = server_factory   # (model_dir, device, dtype, profile) -> LocalServer
        self.server = None                      # the LocalServer this session started
        self._remote = None                     # (url, token, allow_insecure) of a remote server
        self._remote_client_made = None         # its one client, kept: the client caches the server's limits
        self._remote_checked = False            # its version was checked
        self._question = None                   # ServerQuestion in flight
        self._start_events = []                 # what its first step reported
        self._conversations = {}                # volume key -> conversation id on the current server
        self._uploaded_volumes = set()          # ids of the CTs sent to the current server
        self._next_question_id = 1

    # ---- which server --------------------------------------------------------------------------------------

    def set_remote(self, url: str = "", token: str = "", allow_insecure: bool = False) -> None:
        """Use a running `r1seg serve` at `url`; an empty url means a local server started here."""
        remote = (url.strip(), token.strip(), bool(allow_insecure)) if url.strip() else None
        if remote != self._remote:
            self._remote = remote
            self._remote_client_made = None
            self._remote_checked = False
            self._forget_server_state()

    @property
    def remote_url(self) -> str | None:
        return self._remote[0] if self._remote is not None else None

    def _remote_client(self) -> connection.PanelClient:
        if self._remote_client_made is None:
            self._remote_client_made = connection.remote_client(*self._remote)
        return self._remote_client_made

    def _local_server(self, options):
        """The local server for these settings: the running one, or a fresh one after ending the old tree."""
        key = (options.model_dir or None, options.device, options.dtype, options.profile)
        if self.server is not None and (self.server.key != key or not self.server.running):
            self.stop_server()   # other model settings, or it died: one process at a time, never two models
        if self.server is None:
            self.server = self._server_factory(*key)
            self.server.start()
        return self.server

    def describe_connection(self) -> str:
        """Test connection: who answers and whether this panel can use it (raises the server's errors)."""
        if self._remote is not None:
            return connection.connection_report(self._remote_client())
        if self.server is not None and self.server.ready:
            return _("Local server: {description}").format(
                description=connection.connection_report(self.server.client))
        return _("No server URL: questions go to a local server that R1Seg3D starts ({panel}); it is not running"
                 " now.").format(panel=connection.panel_version())

    def model_card(self, model_dir: str | None) -> model_card.ModelCard:
        """The card of the model that answers: the remote server's, else the local folder's."""
        if self._remote is not None:
            return model_card.server_model_card(self._remote_client())
        return model_card.local_model_card(model_dir)

    # ---- questions -----------------------------------------------------------------------------------------

    def start_question(self, volume, volume_key: str, question: str, options) -> int:
        """Send a question about `volume` (engine Volume, read on the main thread); returns its id at once."""
        if self.busy:
            raise RuntimeError("A question is already running.")
        client, server = None, None
        if self._remote is not None:
            client = self._remote_client()
            if not self._remote_checked:
                connection.check_health(client)   # VersionMismatch names both versions
                self._remote_checked = True
        else:
            server = self._local_server(options)

        def conversation_id():
            if volume_key not in self._conversations:
                self._conversations[volume_key] = (client or server.client).new_conversation()
            return self._conversations[volume_key]

        question_id = self._next_question_id
        self._next_question_id += 1
        self._question = server_client.ServerQuestion(question_id, volume, question, options, client=client,
                                                      server=server, conversation_id=conversation_id,
                                                      on_upload=self._uploaded_volumes.add)
        self._start_events = self._question.poll()   # a ready server gets the question now, not at the next tick
        return question_id

    @property
    def busy(self) -> bool:
        """A question (possibly one being cancelled) is still in flight."""
        return self._question is not None and not self._question.finished

    def poll(self) -> list:
        """Events of the current question only; a question abandoned by a scene close is ignored."""
        if self._question is None:
            return []
        events, self._start_events = self._start_events + self._question.poll(), []
        if self._question.finished:
            if self._question.server_lost and self._remote is None:
                self.stop_server()   # the next question starts a new one; a failed start's log is kept
            self._question = None
        return events

    def cancel(self) -> None:
        if self._question is not None:
            self._question.cancel()

    def drop_question(self) -> None:
        """Cancel the question and ignore what it reports from now on (its scene is gone)."""
        self.cancel()
        self._question = None

    # ---- freeing -------------------------------------------------------------------------------------------

    def stop_server(self) -> None:
        """End the local server's whole process tree: frees all of the model's memory, GPU and host."""
        if self.server is not None:
            self.server.stop()
            self.server = None
            self._forget_server_state()

    def unload(self) -> None:
        """Free the model: end the local server, or ask a remote one to unload."""
        self.drop_question()
        if self._remote is not None:
            self._remote_client().unload()
            self._uploaded_volumes = set()   # unloading drops the server's CTs (its conversations stay)
        self.stop_server()

    def _forget_server_state(self) -> None:
        """What this session knows about a server that it no longer uses (stopped, replaced, or unloaded)."""
        self._conversations = {}
        self._uploaded_volumes = set()

    def clear_conversations(self) -> None:
        """The next question about any volume opens a new conversation; the server forgets the old ones."""
        conversations, self._conversations = list(self._conversations.values()), {}
        self._forget_on_server(lambda client: [client.forget_conversation(key) for key in conversations])

    def release_volumes(self) -> None:
        """The scene closes: the server forgets the CTs sent from it (the model stays loaded)."""
        volumes, self._uploaded_volumes = list(self._uploaded_volumes), set()
        self._forget_on_server(lambda client: [client.forget_volume(key) for key in volumes])

    def _forget_on_server(self, forget) -> None:
        """Call `forget(client)` on the server in use, if one answers now; nothing is started for it. A server that
        cannot be reached has lost its state anyway, so that is logged, not raised."""
        if self._remote is not None:
            client = self._remote_client()
        elif self.server is not None and self.server.ready:
            client = self.server.client
        else:
            return
        try:
            forget(client)
        except ServerError as error:
            logging.warning("R1Seg3D: the server could not forget this scene's data: %s", error)

    def shutdown(self) -> None:
        self.drop_question()
        self.stop_server()
