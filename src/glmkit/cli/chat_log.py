"""The terminal chat's log: every exchange (prompt, reply, settings, tokens, time) in SQLite in the
data directory, for `glmkit logs` to list and search and for `chat -c/--cid` to resume.

Its own file (logs.db) next to the web console's conversations.db: the two are written by
different programs at different times, and a schema change in one must not migrate the other.
Numbered migrations from the first schema, counted in PRAGMA user_version, one function each, so a
log written by any earlier glmkit opens in a later one.  Each write is one short transaction."""

from __future__ import annotations

import datetime
import sqlite3
import time
import uuid
from pathlib import Path

from ..errors import GlmkitError
from .options import default_data_dir

LOG_FILE = "logs.db"


def log_path(data_dir: str | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / LOG_FILE


def _m1_conversations_and_responses(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        created TEXT NOT NULL)""")
    db.execute("""CREATE TABLE responses (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id),
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        system TEXT,
        reply TEXT NOT NULL,
        finish_reason TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        duration_ms INTEGER,
        datetime_utc TEXT NOT NULL)""")
    db.execute("CREATE INDEX responses_conversation ON responses(conversation_id, id)")


def _m2_full_text_search(db: sqlite3.Connection) -> None:
    # an external-content index: the text lives once, in responses; triggers keep the index in step
    db.execute("CREATE VIRTUAL TABLE responses_fts USING fts5(prompt, reply, content='responses', content_rowid='id')")
    db.execute("""CREATE TRIGGER responses_ai AFTER INSERT ON responses BEGIN
        INSERT INTO responses_fts(rowid, prompt, reply) VALUES (new.id, new.prompt, new.reply); END""")
    db.execute("""CREATE TRIGGER responses_ad AFTER DELETE ON responses BEGIN
        INSERT INTO responses_fts(responses_fts, rowid, prompt, reply) VALUES ('delete', old.id, old.prompt, old.reply);
        END""")
    db.execute("INSERT INTO responses_fts(responses_fts) VALUES ('rebuild')")


MIGRATIONS = [_m1_conversations_and_responses, _m2_full_text_search]


def fts_query(text: str) -> str:
    """`text` as an FTS5 query that means "all these words": each word a quoted phrase, so what a
    person types (quotes, dashes, AND, NEAR, a `*`) is searched for, never read as query syntax."""
    words = text.split()
    if not words:
        raise GlmkitError("-q needs some words to search for")
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


class ChatLog:
    """One log file.  `open_existing` reads a log without creating one (`glmkit logs`)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(self.path)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.text_factory = lambda b: b.decode("utf-8", "replace")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise GlmkitError(f"{self.path}: cannot open the chat log ({e})") from None

    def _migrate(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")      # two chats starting at once cannot both migrate
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise GlmkitError(f"{self.path} was written by a newer glmkit (schema {version}); upgrade glmkit")
            for n, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(self.db)
                self.db.execute(f"PRAGMA user_version = {n:d}")     # an int, never text
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    # -- writing ---------------------------------------------------------------------------
    def new_conversation(self, name: str, model: str) -> str:
        cid = f"{int(time.time() * 1000):011x}{uuid.uuid4().hex[:8]}"    # sorts by time; unique
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)", (cid, name[:80], model, _now()))
        return cid

    def log(self, cid: str, *, model: str, prompt: str, system: str | None, reply: str,
            finish_reason: str | None, input_tokens: int | None, output_tokens: int | None,
            duration_s: float) -> int:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                "INSERT INTO responses (conversation_id, model, prompt, system, reply, finish_reason, input_tokens, "
                "output_tokens, duration_ms, datetime_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, model, prompt, system, reply, finish_reason, input_tokens, output_tokens,
                 round(duration_s * 1000), _now()))
        return cur.lastrowid

    # -- reading ---------------------------------------------------------------------------
    _SELECT = ("SELECT r.*, c.name AS conversation_name FROM responses r "
               "JOIN conversations c ON c.id = r.conversation_id")

    def recent(self, n: int) -> list[dict]:
        """The last `n` responses, oldest first (the newest ends up next to the prompt)."""
        rows = self.db.execute(f"{self._SELECT} ORDER BY r.id DESC LIMIT ?", (n,)).fetchall()
        return [dict(r) for r in reversed(rows)]

    def search(self, text: str, n: int) -> list[dict]:
        """Responses whose prompt or reply has all the words of `text`, best match last."""
        rows = self.db.execute(f"{self._SELECT} JOIN responses_fts f ON f.rowid = r.id "
                               "WHERE responses_fts MATCH ? ORDER BY f.rank LIMIT ?", (fts_query(text), n)).fetchall()
        return [dict(r) for r in reversed(rows)]

    def latest_conversation(self) -> str | None:
        row = self.db.execute("SELECT conversation_id FROM responses ORDER BY id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def find_conversation(self, cid: str) -> str:
        """The conversation `cid` names: its whole id, or a prefix that only it starts with."""
        if self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
            return cid
        escaped = cid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.db.execute("SELECT id FROM conversations WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
                               (escaped + "%",)).fetchall()
        if len(rows) != 1 or not cid:
            raise GlmkitError(f"no conversation {cid!r} in {self.path}" if not rows else
                              f"{cid!r} starts more than one conversation id; give more of it")
        return rows[0][0]

    def conversation(self, cid: str) -> list[dict]:
        """Its responses, in order."""
        return [dict(r) for r in self.db.execute(f"{self._SELECT} WHERE r.conversation_id = ? ORDER BY r.id",
                                                 (cid,))]

    def history(self, cid: str) -> tuple[list[dict], str | None]:
        """(the conversation's user and assistant messages, its latest system prompt) to feed back
        to the model when it is resumed."""
        messages, system = [], None
        for r in self.conversation(cid):
            messages += [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["reply"]}]
            system = r["system"]
        return messages, system


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Recorder:
    """A chat's side of the log: the conversation it is in (None until its first exchange is
    written, or with --no-log) and each exchange written as it ends.  A log that cannot be
    written (a full disk, a locked file) is said once on stderr; the chat goes on without it."""

    def __init__(self, log: ChatLog | None, model_name: str, conversation_id: str | None = None):
        self.log, self.model_name, self.conversation_id = log, model_name, conversation_id

    def new_conversation(self) -> None:
        self.conversation_id = None

    def record(self, prompt: str, system: str | None, text: str, reply, duration_s: float) -> None:
        """`reply`: what the model's Reply (or the last generation of an agent's answer) says of
        the tokens and why it stopped."""
        if self.log is None:
            return
        try:
            if self.conversation_id is None:
                self.conversation_id = self.log.new_conversation(prompt, self.model_name)
            self.log.log(self.conversation_id, model=self.model_name, prompt=prompt, system=system, reply=text,
                         finish_reason=getattr(reply, "finish_reason", None),
                         input_tokens=getattr(reply, "prompt_tokens", None),
                         output_tokens=getattr(reply, "completion_tokens", None), duration_s=duration_s)
        except sqlite3.Error as e:
            import sys
            print(f"glmkit: warning: not logging this chat any more: {self.log.path}: {e}", file=sys.stderr)
            self.log = None


def resume(continue_latest: bool, cid: str | None, data_dir: str | None = None) -> tuple[list[dict], str | None, str | None]:
    """(messages, system prompt, conversation id) of the logged conversation that `chat -c` or
    `chat --cid ID` continues; ([], None, None) for a new one."""
    if not continue_latest and not cid:
        return [], None, None
    path = log_path(data_dir)
    try:
        log = ChatLog(path, create=False)
    except FileNotFoundError:
        raise GlmkitError(f"no logged conversation to continue: {path} does not exist") from None
    try:
        found = log.find_conversation(cid) if cid else log.latest_conversation()
        if found is None:
            raise GlmkitError(f"no logged conversation to continue: {path} is empty")
        messages, system = log.history(found)
    finally:
        log.close()
    return messages, system, found
