"""Render the Medical SAM3 panel (``MedicalSAM3Slicer/Resources/UI/MedicalSAM3.ui``) to a PNG without 3D Slicer.

The .ui file is loaded by Qt's own ``QUiLoader``, so a broken .ui fails here too. Slicer's widgets
(MRML node selectors, CTK collapsible sections, sliders, path fields) are replaced by plain Qt
stand-ins with the same names and properties, so the picture shows the panel's layout, labels and
defaults, not Slicer's exact look. Maintainer tool (needs ``pip install PySide6-Essentials``)::

    python Testing/tools/render_panel.py Resources/Screenshots/panel.svg   # or .png

Several outputs are drawn from one loading of the panel; ``--scale 2`` draws the raster ones (.png)
at twice the pixels (an SVG is the same at any scale). The screenshot that the extensions catalog
shows (``EXTENSION_SCREENSHOTURLS``: PNG, JPEG or GIF only) and the README's picture are made
together::

    python Testing/tools/render_panel.py --scale 2 Resources/Screenshots/panel.svg Resources/Screenshots/panel.png
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Property, QFile, Qt  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import (QApplication, QComboBox, QDoubleSpinBox, QGroupBox, QHBoxLayout,  # noqa: E402
                               QLineEdit, QSlider, QWidget)

UI = Path(__file__).resolve().parents[2] / "MedicalSAM3Slicer" / "Resources" / "UI" / "MedicalSAM3.ui"


class qMRMLWidget(QWidget):
    pass


class qMRMLNodeComboBox(QComboBox):
    pass


class ctkPathLineEdit(QLineEdit):
    pass


class ctkCollapsibleButton(QGroupBox):
    def _text(self) -> str:
        return self.title()

    def _set_text(self, value: str) -> None:
        self.setTitle(("\u25b8 " if self.property("collapsedState") else "\u25be ") + value)

    def _collapsed(self) -> bool:
        return bool(self.property("collapsedState"))

    def _set_collapsed(self, value: bool) -> None:
        self.setProperty("collapsedState", value)

    text = Property(str, _text, _set_text)
    collapsed = Property(bool, _collapsed, _set_collapsed)


class ctkSliderWidget(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider, self.spin = QSlider(Qt.Horizontal), QDoubleSpinBox()
        layout.addWidget(self.slider)
        layout.addWidget(self.spin)

    def _get(name):
        return lambda self: getattr(self.spin, name)()

    def _set(name):
        def setter(self, value) -> None:
            getattr(self.spin, "set" + name[0].upper() + name[1:])(value)
            span = self.spin.maximum() - self.spin.minimum()
            self.slider.setValue(int(100 * (self.spin.value() - self.spin.minimum()) / span) if span else 0)
        return setter

    value = Property(float, _get("value"), _set("value"))
    minimum = Property(float, _get("minimum"), _set("minimum"))
    maximum = Property(float, _get("maximum"), _set("maximum"))
    singleStep = Property(float, _get("singleStep"), _set("singleStep"))
    decimals = Property(int, _get("decimals"), _set("decimals"))


def render(output: Path, *more: Path, scale: float = 1.0) -> Path:
    """Load the panel once and write it to ``output`` (and to each of ``more``): .svg as vector, else a
    raster image in the format Qt picks from the suffix, ``scale`` device pixels per pixel. Returns
    ``output``."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    loader = QUiLoader()
    for cls in (qMRMLWidget, qMRMLNodeComboBox, ctkPathLineEdit, ctkCollapsibleButton, ctkSliderWidget):
        loader.registerCustomWidget(cls)
    handle = QFile(str(UI))
    handle.open(QFile.ReadOnly)
    panel = loader.load(handle)
    handle.close()
    if panel is None:
        raise SystemExit(f"Qt could not load {UI}: {loader.errorString()}")
    # what a user sees after loading a CT and typing three structures
    panel.findChild(QComboBox, "inputVolumeSelector").addItem("example_ct_sm")
    panel.findChild(QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    panel.findChild(QLineEdit, "promptLineEdit").setText("liver, spleen, aorta")
    panel.findChild(QComboBox, "modeComboBox").addItems(["propagate", "slices"])
    panel.findChild(QComboBox, "windowComboBox").addItems(["auto", "soft_tissue", "abdomen", "lung", "bone", "brain"])
    panel.findChild(QComboBox, "deviceComboBox").addItems(["auto", "cuda", "cpu", "mps"])
    panel.resize(420, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    for path in (output, *more):
        _write(panel, Path(path), scale)
    return output


def _write(panel: QWidget, output: Path, scale: float = 1.0) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".svg":  # text, not a binary: what the repository keeps
        from PySide6.QtCore import QRect, QSize
        from PySide6.QtSvg import QSvgGenerator

        generator = QSvgGenerator()
        generator.setFileName(str(output))
        generator.setSize(QSize(panel.width(), panel.height()))
        generator.setViewBox(QRect(0, 0, panel.width(), panel.height()))
        generator.setTitle("Medical SAM3 panel (rendered from MedicalSAM3.ui with Qt stand-ins for Slicer widgets)")
        panel.render(generator)
    elif not _grab(panel, scale).save(str(output)):
        raise SystemExit(f"could not write {output}")


def _grab(panel: QWidget, scale: float):
    if scale == 1:
        return panel.grab()
    from PySide6.QtGui import QPixmap

    pixmap = QPixmap(round(panel.width() * scale), round(panel.height() * scale))
    pixmap.setDevicePixelRatio(scale)
    pixmap.fill(panel.palette().window().color())
    panel.render(pixmap)
    return pixmap


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Render the Medical SAM3 panel from its .ui file.")
    parser.add_argument("outputs", nargs="*", type=Path, default=[Path("panel.png")],
                        help=".svg, .png, ... (default: panel.png)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="device pixels per pixel of raster outputs (e.g. 2 for a sharp screenshot)")
    args = parser.parse_args(argv)
    render(*args.outputs, scale=args.scale)
    for path in args.outputs:
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
