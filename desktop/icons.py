"""The app's icon, drawn in code: a honeycomb cell, amber while the node serves, grey otherwise."""

from __future__ import annotations

import math

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPen, QPixmap, QPolygonF

SERVING = QColor("#f2a900")
IDLE = QColor("#8a8f98")
FAILED = QColor("#d64541")


def hive_icon(color: QColor, size: int = 64) -> QIcon:
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    center, radius = QPointF(size / 2, size / 2), size * 0.46
    cell = QPolygonF([center + QPointF(radius * math.cos(math.pi / 3 * k + math.pi / 6),
                                       radius * math.sin(math.pi / 3 * k + math.pi / 6)) for k in range(6)])
    painter.setPen(QPen(color.darker(140), size / 16))
    painter.setBrush(color)
    painter.drawPolygon(cell)
    painter.setPen(QPen(QColor("white"), size / 12))
    for dy in (-0.16, 0.0, 0.16):  # three stacked bars: layers
        y = size / 2 + dy * size
        painter.drawLine(QPointF(size * 0.32, y), QPointF(size * 0.68, y))
    painter.end()
    return QIcon(pixmap)
