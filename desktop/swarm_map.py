"""The swarm map: every node of the swarm as a bar over the layers it serves, the chain that computed the last
answer, and the replicas each layer has, as the DHT's records show them (`NodeController.swarm_status`), read
again every few seconds while the window is open. Layers no online node serves are marked red across the map
and named above it; hovering a bar shows that node's figures, with what was never measured said so."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PySide6.QtCore import QPoint, QRectF, Qt, QTimer
from PySide6.QtGui import QColor, QFont, QFontMetrics, QKeySequence, QMouseEvent, QPainter, QPaintEvent, QPen, QShortcut
from PySide6.QtWidgets import QLabel, QToolTip, QVBoxLayout, QWidget

from desktop.bridge import NodeBridge
from desktop.icons import FAILED, IDLE, SERVING, hive_icon
from desktop.wording import layer_list, layer_range, model_label, plural, short_peer
from node.serve.assignment import SwarmStatus
from swarm.types import Hop

STATE_COLORS = {"online": SERVING, "draining": QColor("#f6cf70")}
OWN_OUTLINE, CHAIN_COLOR = QColor("#1b1b1b"), QColor("#1f6feb")
ONE_REPLICA, REPLICATED = QColor("#e0b040"), QColor("#5aa469")
GAP_BAND = QColor(214, 69, 65, 48)
MARGIN, GUTTER, AXIS_HEIGHT, ROW_HEIGHT, ROW_GAP, CHAIN_HEIGHT, STRIP_HEIGHT = 12, 84, 22, 26, 6, 20, 24


@dataclass(frozen=True)
class MapNode:
    peer_id: str
    state: str
    layers: tuple[int, int] | None  # [start, end) it serves; None while joining
    sessions: int
    queue_len: int
    layer_latency_ms: float | None  # None: not measured yet
    memory_gb: float | None
    uplink_mbps: float | None
    region: str
    checked_tokens: int = 0  # tokens other clients' checks vouch for (node.net.credit)
    checked_by: int = 0  # how many clients vouch for them


@dataclass(frozen=True)
class SwarmSnapshot:
    status: SwarmStatus  # the swarm's numbers (replicas per layer, uncovered layers, ...)
    nodes: tuple[MapNode, ...]  # its nodes in the map's units


def read_swarm_status(status: SwarmStatus) -> SwarmSnapshot:
    """The one place that reads `node.serve.assignment.SwarmStatus` for the map, in the map's units; a figure
    announced as 0 was never measured (the planner then guesses), so it shows as unmeasured."""
    def measured(value: float, scale: float) -> float | None:
        return value * scale if value else None

    nodes = tuple(MapNode(
        peer_id=p.record.peer_id, state=p.record.state,
        layers=None if p.serving is None else (p.serving.start, p.serving.end), sessions=p.record.sessions,
        queue_len=p.record.queue_len, layer_latency_ms=measured(p.record.layer_latency_s, 1e3),
        memory_gb=measured(p.record.memory_bytes, 1e-9), uplink_mbps=measured(p.record.uplink_bps, 1e-6),
        region=p.record.region, **_credit(status, p.record.peer_id)) for p in status.nodes)
    return SwarmSnapshot(status, nodes)


def _credit(status: SwarmStatus, peer_id: str) -> dict[str, int]:
    credit = status.credit.get(peer_id)
    return {} if credit is None else {"checked_tokens": credit.tokens, "checked_by": credit.clients}


def pack_rows(nodes: Sequence[MapNode]) -> list[list[MapNode]]:
    """The nodes that serve a range, in rows where no two bars overlap (first fit, by start), so that each
    bar stays readable however many replicas a layer has."""
    rows: list[list[MapNode]] = []
    ends: list[int] = []
    for node in sorted((n for n in nodes if n.layers), key=lambda n: n.layers):
        start, end = node.layers
        for index, row_end in enumerate(ends):
            if row_end <= start:
                rows[index].append(node)
                ends[index] = end
                break
        else:
            rows.append([node])
            ends.append(end)
    return rows


def figure(value: float | None, unit: str, digits: int = 1) -> str:
    return "unmeasured" if value is None else f"{value:.{digits}f} {unit}"


def latency_text(ms: float | None, unit: str = "ms per layer") -> str:
    """'0.42 ms per layer', '12 ms per layer', 'speed unmeasured' (a node that has not served nor benchmarked)."""
    if ms is None:
        return "speed unmeasured"
    return f"{ms:.{0 if ms >= 10 else 1 if ms >= 1 else 2}f} {unit}"


def describe_node(node: MapNode, own: bool) -> str:
    """A node's hover text: who, what it serves, its load and its figures, with units."""
    where = layer_range(*node.layers) if node.layers else "no layers yet"
    load = f"{plural(node.sessions, 'open session')}, {plural(node.queue_len, 'step')} queued"
    figures = [latency_text(node.layer_latency_ms), f"memory offered {figure(node.memory_gb, 'GB')}",
               f"uplink {figure(node.uplink_mbps, 'Mbit/s', 0)}"]
    if node.region:
        figures.append(f"region {node.region}")
    checked = (f"checked work: {plural(node.checked_tokens, 'token')}, vouched for by "
               f"{plural(node.checked_by, 'client')}" if node.checked_by else "checked work: none yet")
    return (f"{'This node (yours)' if own else 'Node'} {node.peer_id}\n{node.state}, {where}, {load}\n"
            + ", ".join(figures) + f"\n{checked}")


def tooltip(node: MapNode, own: bool) -> str:
    """`describe_node` as rich text that shows a peer's own words (its region) as written, never as markup: a
    tooltip would otherwise take text that looks like HTML for HTML."""
    return "<qt>" + html.escape(describe_node(node, own)).replace("\n", "<br>") + "</qt>"


def replicas_text(low: int, high: int) -> str:
    return plural(high, "replica") if low == high else f"{low}–{high} replicas"


def tick_layers(num_layers: int, width_px: float) -> list[int]:
    """Which layers get a number on the axis: a round step that leaves ~28 px per label, and the last layer."""
    wanted = num_layers * 28 / max(width_px, 1)
    step = next((s for s in (1, 2, 5, 10, 20, 50, 100, 200) if s >= wanted), math.ceil(wanted))
    ticks = list(range(0, num_layers, step))
    if ticks[-1] != num_layers - 1:
        if len(ticks) > 1 and num_layers - 1 - ticks[-1] <= step / 2:
            ticks.pop()
        ticks.append(num_layers - 1)
    return ticks


class SwarmMapView(QWidget):
    """Paints one swarm: a layer axis, bars of nodes in rows, the last answer's chain, replicas per layer."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.snapshot: SwarmSnapshot | None = None
        self.error: str | None = None
        self.own_peer_id: str | None = None
        self.chain: tuple[Hop, ...] = ()
        self.rows: list[list[MapNode]] = []
        self._bars: list[tuple[QRectF, MapNode]] = []  # where each node was drawn, for the hover text
        self.setMouseTracking(True)
        self.setMinimumSize(560, 160)

    def set_status(self, status: SwarmStatus | None, own_peer_id: str | None = None) -> None:
        """`status`: the swarm as read, None when not connected."""
        self.own_peer_id = own_peer_id
        self.error = None
        self.snapshot = read_swarm_status(status) if status is not None else None
        self.rows = pack_rows(self.snapshot.nodes) if self.snapshot else []
        self.setMinimumHeight(self._strip_top() + STRIP_HEIGHT + MARGIN)
        self.update()

    def set_error(self, error: str) -> None:
        """The swarm could not be read: the map says why instead of showing stale bars."""
        self.set_status(None, self.own_peer_id)
        self.error = error

    def set_chain(self, chain: Sequence[Hop]) -> None:
        self.chain = tuple(chain)
        self.update()

    def message(self) -> str | None:
        """What the map says instead of bars, if anything."""
        if self.error:
            return f"Could not read the swarm: {self.error}"
        if self.snapshot is None:
            return "Not connected to the swarm yet."
        if not self.rows:
            return "No node serves this model yet."
        return None

    def _strip_top(self) -> int:
        """Where the replicas' strip begins: under the axis, the rows of bars and the chain's row."""
        return MARGIN + AXIS_HEIGHT + len(self.rows) * (ROW_HEIGHT + ROW_GAP) + (CHAIN_HEIGHT + ROW_GAP) + 4

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.palette().base())
        self._bars = []
        if (text := self.message()) is not None:
            painter.setPen(self.palette().text().color())
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, text)
            return
        layers = self.snapshot.status.num_layers
        left, width = MARGIN + GUTTER, self.width() - 2 * MARGIN - GUTTER
        x = lambda layer: left + width * layer / layers  # noqa: E731
        self._paint_gaps(painter, x)
        self._paint_axis(painter, x, width)
        top = MARGIN + AXIS_HEIGHT
        self._caption(painter, top, ROW_HEIGHT, "nodes")
        for row in self.rows:
            for node in row:
                start, end = node.layers
                self._paint_bar(painter, node, QRectF(x(start) + 1, top, x(end) - x(start) - 2, ROW_HEIGHT))
            top += ROW_HEIGHT + ROW_GAP
        self._paint_chain(painter, x, top)
        self._paint_replicas(painter, x, self._strip_top())

    def _caption(self, painter: QPainter, top: float, height: float, text: str) -> None:
        painter.setPen(self.palette().text().color())
        painter.drawText(QRectF(MARGIN, top, GUTTER - 8, height),
                         Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft, text)

    def _paint_gaps(self, painter: QPainter, x: Callable[[float], float]) -> None:
        """A red band over every layer no online node serves, from the axis down through the replicas."""
        bottom = self._strip_top() + STRIP_HEIGHT
        for layer in self.snapshot.status.uncovered_layers:
            painter.fillRect(QRectF(x(layer), MARGIN, x(layer + 1) - x(layer), bottom - MARGIN), GAP_BAND)

    def _paint_axis(self, painter: QPainter, x: Callable[[float], float], width: float) -> None:
        """Numbers under each labelled layer's middle: layer i is the cell [x(i), x(i + 1))."""
        self._caption(painter, MARGIN, AXIS_HEIGHT - 6, "layer")
        base = MARGIN + AXIS_HEIGHT - 2
        painter.drawLine(int(x(0)), int(base), int(x(self.snapshot.status.num_layers)), int(base))
        for layer in tick_layers(self.snapshot.status.num_layers, width):
            middle = (x(layer) + x(layer + 1)) / 2
            painter.drawLine(int(middle), int(base - 4), int(middle), int(base))
            painter.drawText(QRectF(middle - 20, MARGIN, 40, AXIS_HEIGHT - 6), Qt.AlignmentFlag.AlignCenter, str(layer))

    def _paint_bar(self, painter: QPainter, node: MapNode, rect: QRectF) -> None:
        own = node.peer_id == self.own_peer_id
        in_chain = any(hop.node_id == node.peer_id for hop in self.chain)
        fill = STATE_COLORS.get(node.state, IDLE)
        if in_chain:  # outside the bar's own outline, so "yours" and "in the chain" both show
            painter.setPen(QPen(CHAIN_COLOR, 3))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRoundedRect(rect.adjusted(-2, -2, 2, 2), 5, 5)
        painter.setPen(QPen(OWN_OUTLINE, 2.5) if own else QPen(fill.darker(150), 1))
        painter.setBrush(fill)
        painter.drawRoundedRect(rect, 4, 4)
        font = QFont(self.font())
        font.setBold(own)
        painter.setFont(font)
        label = " · ".join([*(["you"] if own else []), short_peer(node.peer_id), plural(node.sessions, "session"),
                            latency_text(node.layer_latency_ms, "ms/layer")])
        painter.setPen(QColor("#1b1b1b"))
        text_rect = rect.adjusted(5, 0, -5, 0)
        elided = QFontMetrics(font).elidedText(label, Qt.TextElideMode.ElideRight, int(text_rect.width()))
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignVCenter, elided)
        painter.setFont(self.font())
        self._bars.append((rect, node))

    def _paint_chain(self, painter: QPainter, x: Callable[[float], float], top: float) -> None:
        """The last answer's chain: a blue segment per hop, over the layers that hop ran."""
        self._caption(painter, top, CHAIN_HEIGHT, "last answer")
        if not self.chain:
            painter.setPen(QColor("#6b6f76"))
            painter.drawText(QRectF(x(0), top, x(self.snapshot.status.num_layers) - x(0), CHAIN_HEIGHT),
                             Qt.AlignmentFlag.AlignVCenter, "no answer yet: ask in the chat to see its chain here")
            return
        for hop in self.chain:
            rect = QRectF(x(hop.start) + 1, top + 3, x(hop.end) - x(hop.start) - 2, CHAIN_HEIGHT - 6)
            painter.fillRect(rect, CHAIN_COLOR)
            painter.setPen(QColor("white"))
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter,
                             QFontMetrics(self.font()).elidedText(short_peer(hop.node_id), Qt.TextElideMode.ElideRight,
                                                                  int(rect.width())))

    def _paint_replicas(self, painter: QPainter, x: Callable[[float], float], top: float) -> None:
        """One cell per layer: red where no online node serves it, amber for a single replica, green above."""
        self._caption(painter, top, STRIP_HEIGHT, "replicas")
        for layer, count in enumerate(self.snapshot.status.replicas_per_layer):
            color = FAILED if count == 0 else ONE_REPLICA if count == 1 else REPLICATED
            rect = QRectF(x(layer), top, x(layer + 1) - x(layer), STRIP_HEIGHT)
            painter.fillRect(rect.adjusted(0.5, 0, -0.5, 0), color)
            if rect.width() >= 12:
                painter.setPen(QColor("white"))
                painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, str(count))

    def node_at(self, point: QPoint) -> MapNode | None:
        return next((node for rect, node in self._bars if rect.contains(point.toPointF())), None)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 (Qt's name)
        node = self.node_at(event.position().toPoint())
        if node is None:
            QToolTip.hideText()
        else:
            QToolTip.showText(event.globalPosition().toPoint(), tooltip(node, node.peer_id == self.own_peer_id), self)


def swatch(color: QColor, text: str, outline: bool = False) -> str:
    mark = "□" if outline else "■"
    return f"<span style='color:{color.name()}; font-size:large'>{mark}</span>&nbsp;{text}"


LEGEND = "&nbsp;&nbsp; ".join([
    swatch(SERVING, "online node"), swatch(STATE_COLORS["draining"], "draining (finishing its answers)"),
    swatch(OWN_OUTLINE, "<b>you</b>: this node", outline=True), swatch(CHAIN_COLOR, "last answer's chain"),
    "replicas per layer:", swatch(REPLICATED, "2 or more"), swatch(ONE_REPLICA, "1"), swatch(FAILED, "0: not served"),
])


class SwarmMapWindow(QWidget):
    def __init__(self, bridge: NodeBridge, *, refresh_ms: int = 3000, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.setWindowTitle("Layerhive swarm map")
        self.setWindowIcon(hive_icon(SERVING))
        self.resize(820, 320)
        self.summary = QLabel("Reading the swarm…")
        self.gap_warning = QLabel()
        self.gap_warning.setStyleSheet(f"color: {FAILED.name()}; font-weight: bold")
        self.gap_warning.setWordWrap(True)
        self.gap_warning.hide()
        self.view = SwarmMapView()
        self.legend = QLabel(LEGEND)
        self.legend.setWordWrap(True)
        self.legend.setToolTip("Hover a node's bar for its figures: ms per layer (one token, one layer), memory "
                               "offered in GB, uplink in Mbit/s; 'unmeasured' where the node has not measured it yet.")
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.gap_warning)
        layout.addWidget(self.view)
        layout.addWidget(self.legend)
        layout.addStretch(1)  # a taller window leaves the room below, not inside the map
        self._timer = QTimer(self)  # reads again only while the window is shown
        self._timer.timeout.connect(bridge.refresh_swarm)
        self._timer.setInterval(refresh_ms)
        bridge.swarm_changed.connect(self.show_swarm)
        bridge.swarm_failed.connect(self.show_error)
        bridge.chat_done.connect(lambda reply: self.show_chain(reply.stats.chains))
        if bridge.last_reply is not None:
            self.show_chain(bridge.last_reply.stats.chains)
        QShortcut(QKeySequence("Ctrl+W"), self, self.close)

    def show_chain(self, chains: Sequence[Sequence[Hop]]) -> None:
        """Highlights the chain that finished the last answer (the last one, after a failover)."""
        self.view.set_chain(chains[-1] if chains else ())

    def show_error(self, error: str) -> None:
        self.view.set_error(error)
        self.summary.setText(self.view.message() or "")
        self.gap_warning.hide()

    def show_swarm(self, status: SwarmStatus | None) -> None:
        self.view.set_status(status, self.bridge.status().peer_id)
        snapshot = self.view.snapshot
        if snapshot is None:
            self.summary.setText(self.view.message() or "")
            self.gap_warning.hide()
            return
        self.summary.setText(self._summary(snapshot))
        self.summary.setToolTip(f"Assignment epoch {snapshot.status.epoch}: it grows each time the swarm re-plans "
                                "which node serves which layers.")
        uncovered = snapshot.status.uncovered_layers
        self.gap_warning.setVisible(bool(uncovered))
        if len(uncovered) == snapshot.status.num_layers:
            self.gap_warning.setText(f"No online node serves any of the {snapshot.status.num_layers} layers: "
                                     "the swarm cannot answer now.")
        elif uncovered:
            self.gap_warning.setText(f"Gap: no online node serves {layer_list(uncovered)}. "
                                     "The swarm cannot answer until a node serves them.")

    def _summary(self, snapshot: SwarmSnapshot) -> str:
        replicas = snapshot.status.replicas_per_layer
        joining = sum(node.layers is None for node in snapshot.nodes)
        serving = len(snapshot.nodes) - joining
        parts = [f"<b>{model_label(snapshot.status.model)}</b>", plural(snapshot.status.num_layers, "layer"),
                 plural(serving, "node") + " serving" + (f" ({joining} joining)" if joining else ""),
                 f"{replicas_text(min(replicas, default=0), max(replicas, default=0))} per layer",
                 self._own_summary()]
        return " · ".join(parts)

    def _own_summary(self) -> str:
        status = self.bridge.status()
        if status.state == "online" and status.layers is not None:
            return f"your node serves {layer_range(*status.layers)}"
        return f"your node is {status.state}" + (" (not on the map)" if status.state != "joining" else "")

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self.bridge.refresh_swarm()
        self._timer.start()

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().hideEvent(event)
        self._timer.stop()
