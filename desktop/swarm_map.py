"""The swarm map: every node of the swarm as a bar over the layers it serves, and the replicas each layer
has, as the DHT's records show them (`NodeController.swarm_status`), read again every few seconds while
the window is open. Hovering a bar shows that node's figures."""

from __future__ import annotations

from collections.abc import Iterable

from PySide6.QtCore import QPoint, QRectF, Qt, QTimer
from PySide6.QtGui import QColor, QFont, QMouseEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QLabel, QToolTip, QVBoxLayout, QWidget

from desktop.bridge import NodeBridge
from desktop.icons import FAILED, IDLE, SERVING, hive_icon
from node.serve.assignment import PeerStatus, SwarmStatus

STATE_COLORS = {"online": SERVING, "draining": QColor("#f6cf70"), "joining": IDLE}
MARGIN, ROW_HEIGHT, ROW_GAP, AXIS_HEIGHT, STRIP_HEIGHT = 16, 26, 6, 22, 24


def pack_rows(nodes: Iterable[PeerStatus]) -> list[list[PeerStatus]]:
    """The nodes that serve a range, in rows where no two bars overlap (first fit, by start), so that each
    bar stays readable however many replicas a layer has."""
    rows: list[list[PeerStatus]] = []
    ends: list[int] = []
    serving = [n for n in nodes if n.serving is not None]
    for node in sorted(serving, key=lambda n: (n.serving.start, n.serving.end)):
        start, end = node.serving.start, node.serving.end
        for index, row_end in enumerate(ends):
            if row_end <= start:
                rows[index].append(node)
                ends[index] = end
                break
        else:
            rows.append([node])
            ends.append(end)
    return rows


def describe_node(node: PeerStatus, own: bool) -> str:
    record, layers = node.record, node.serving
    details = [f"{record.layer_latency_s * 1e3:.2f} ms per layer", f"{record.memory_bytes / 1e9:.1f} GB offered"]
    if record.uplink_bps > 0:  # 0: not measured (no peer to measure against when it joined)
        details.append(f"{record.uplink_bps / 1e6:.0f} Mbit/s up")
    if record.region:
        details.append(record.region)
    where = f"layers {layers.start}–{layers.end}" if layers is not None else "no layers yet"
    return (f"{'This node' if own else 'Node'} {record.peer_id}\n"
            f"{record.state}, {where}, {record.sessions} open sessions, queue {record.queue_len}\n"
            + ", ".join(details))


class SwarmMapView(QWidget):
    """Paints one `SwarmStatus`: bars of nodes in rows over a layer axis, then replicas per layer."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.status: SwarmStatus | None = None
        self.error: str | None = None  # why the last read of the swarm failed
        self.own_peer_id: str | None = None
        self.rows: list[list[PeerStatus]] = []
        self._bars: list[tuple[QRectF, PeerStatus]] = []  # where each node was drawn, for the hover text
        self.setMouseTracking(True)
        self.setMinimumSize(480, 160)

    def set_status(self, status: SwarmStatus | None, own_peer_id: str | None = None) -> None:
        self.status, self.error, self.own_peer_id = status, None, own_peer_id
        self.rows = pack_rows(status.nodes) if status is not None else []
        self.setMinimumHeight(2 * MARGIN + AXIS_HEIGHT + len(self.rows) * (ROW_HEIGHT + ROW_GAP) + STRIP_HEIGHT + 30)
        self.update()

    def set_error(self, error: str) -> None:
        """The swarm could not be read: the map says why instead of showing stale bars."""
        self.set_status(None, self.own_peer_id)
        self.error = error

    def message(self) -> str | None:
        """What the map says instead of bars, if anything."""
        if self.error is not None:
            return f"Could not read the swarm: {self.error}"
        if self.status is None:
            return "Not connected to the swarm yet."
        if not self.rows:
            return "No node serves this model yet."
        return None

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.palette().base())
        self._bars = []
        if (text := self.message()) is not None:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, text)
            return
        layers = self.status.num_layers
        left, width = MARGIN, self.width() - 2 * MARGIN
        x = lambda layer: left + width * layer / layers  # noqa: E731
        self._paint_axis(painter, layers, x)
        top = MARGIN + AXIS_HEIGHT
        bold = QFont(self.font())
        bold.setBold(True)
        for row in self.rows:
            for node in row:
                record, start, end = node.record, node.serving.start, node.serving.end
                rect = QRectF(x(start) + 1, top, x(end) - x(start) - 2, ROW_HEIGHT)
                own = record.peer_id == self.own_peer_id
                color = STATE_COLORS.get(record.state, IDLE)
                painter.setPen(QPen(QColor("#222222") if own else color.darker(150), 2.5 if own else 1))
                painter.setBrush(color)
                painter.drawRoundedRect(rect, 4, 4)
                painter.setFont(bold if own else self.font())
                label = f"{'you · ' if own else ''}…{record.peer_id[-6:]} · {record.sessions} sess"
                painter.setPen(QColor("#1b1b1b"))
                painter.drawText(rect.adjusted(4, 0, -4, 0), Qt.AlignmentFlag.AlignVCenter, label)
                self._bars.append((rect, node))
            top += ROW_HEIGHT + ROW_GAP
        painter.setFont(self.font())
        self._paint_replicas(painter, self.status.replicas_per_layer, x, top + 4)

    def _paint_axis(self, painter: QPainter, layers: int, x) -> None:
        painter.setPen(self.palette().text().color())
        step = max(1, round(layers / 10))
        for layer in [*range(0, layers, step), layers]:
            painter.drawLine(int(x(layer)), MARGIN + AXIS_HEIGHT - 6, int(x(layer)), MARGIN + AXIS_HEIGHT - 2)
            painter.drawText(QRectF(x(layer) - 20, MARGIN, 40, AXIS_HEIGHT - 6), Qt.AlignmentFlag.AlignCenter,
                             str(layer))

    def _paint_replicas(self, painter: QPainter, replicas: Iterable[int], x, top: float) -> None:
        """One cell per layer: red where no online node serves it, amber for a single replica, green above."""
        for layer, count in enumerate(replicas):
            color = FAILED if count == 0 else QColor("#e0b040") if count == 1 else QColor("#5aa469")
            rect = QRectF(x(layer), top, x(layer + 1) - x(layer), STRIP_HEIGHT)
            painter.fillRect(rect.adjusted(0.5, 0, -0.5, 0), color)
            if rect.width() >= 12:
                painter.setPen(QColor("white"))
                painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, str(count))
        painter.setPen(self.palette().text().color())
        painter.drawText(QRectF(MARGIN, top + STRIP_HEIGHT + 2, self.width() - 2 * MARGIN, 20),
                         Qt.AlignmentFlag.AlignLeft, "replicas per layer (online nodes)")

    def node_at(self, point: QPoint) -> PeerStatus | None:
        return next((node for rect, node in self._bars if rect.contains(point.toPointF())), None)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 (Qt's name)
        node = self.node_at(event.position().toPoint())
        if node is None:
            QToolTip.hideText()
        else:
            text = describe_node(node, node.record.peer_id == self.own_peer_id)
            QToolTip.showText(event.globalPosition().toPoint(), text, self)


class SwarmMapWindow(QWidget):
    def __init__(self, bridge: NodeBridge, *, refresh_ms: int = 3000, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.setWindowTitle("Layerhive swarm map")
        self.setWindowIcon(hive_icon(SERVING))
        self.resize(720, 320)
        self.summary = QLabel("Reading the swarm…")
        self.view = SwarmMapView()
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.view, 1)
        self._timer = QTimer(self)  # reads again only while the window is shown
        self._timer.timeout.connect(bridge.refresh_swarm)
        self._timer.setInterval(refresh_ms)
        bridge.swarm_changed.connect(self.show_swarm)
        bridge.swarm_failed.connect(self.show_error)

    def show_swarm(self, status: SwarmStatus | None) -> None:
        self.view.set_status(status, self.bridge.status().peer_id)
        if status is not None:
            uncovered, low, high = status.uncovered_layers, status.min_replicas, status.max_replicas
            self.summary.setText(
                f"{status.model}: {len(status.nodes)} nodes, {status.num_layers} layers, "
                f"{low if low == high else f'{low}–{high}'} replicas per layer, epoch {status.epoch}"
                + (f" · not served now: layers {', '.join(map(str, uncovered))}" if uncovered else ""))
        else:
            self.summary.setText(self.view.message() or "")

    def show_error(self, error: str) -> None:
        self.view.set_error(error)
        self.summary.setText(self.view.message() or "")

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self.bridge.refresh_swarm()
        self._timer.start()

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().hideEvent(event)
        self._timer.stop()
