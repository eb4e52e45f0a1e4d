"""Does the similar-cases SR open in OHIF 3, served against Orthanc's DICOMweb, with each item and its label?

Not part of ``make test``: it fetches OHIF's prebuilt bundle from the npm registry (``npm pack @ohif/app``, about
50 MB packed) into ``var/ohif`` once. It starts the stack as ``lookalike run`` does (Orthanc's DICOMweb metadata set
to "Full", which OHIF needs), stores three one-image US studies, files the SR of the first through the plugin's
``similar-report`` route and its key images through ``similar-kos``, serves OHIF from a standard-library HTTP
server that also proxies ``/dicom-web`` and ``/wado`` to Orthanc (same origin: no CORS), opens the SR in headless
Chromium (Debian's, driven by playwright), prints which of the SR's labels and values the page shows and whether
the study panel lists the KOS series, and saves screenshots of both views.

    .venv/bin/python bench/ohif_sr_check.py [--screenshot var/ohif_sr.png]
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests

from lookalike.lab.samples import wrap_image
from lookalike.dicom.kos import KOS_SERIES_DESCRIPTION
from lookalike.dicom.sr import CODES
from lookalike.ops.stack import Stack, StackConfig, free_port, storescu

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "deploy" / "samples"
OHIF_VERSION = "3.13.2"
#: Parts of the bundle the basic viewer and its SR view do not load (136 MB of ONNX runtime, the microscopy viewer).
UNUSED = ("ort", "dicom-microscopy-viewer")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: [{ 'ohif.tours': { $set: [] } }],
  showStudyList: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc', name: 'orthanc',
      qidoRoot: '/dicom-web', wadoRoot: '/dicom-web', wadoUriRoot: '/wado',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true, staticWado: false,
      singlepart: 'bulkdata,video', bulkDataURI: { enabled: true }, omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def fetch_ohif(folder: Path) -> Path:
    """OHIF's prebuilt ``dist`` folder, fetched with ``npm pack`` the first time."""
    dist = folder / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", f"@ohif/app@{OHIF_VERSION}"], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(folder / f"ohif-app-{OHIF_VERSION}.tgz") as tar:
        tar.extractall(folder, filter="data")
    for name in UNUSED:
        shutil.rmtree(dist / name, ignore_errors=True)
    return dist


def serve_ohif(dist: Path, orthanc_url: str, user: str, password: str) -> tuple[http.server.HTTPServer, str]:
    """OHIF at the root of a loopback origin, with ``/dicom-web`` and ``/wado`` proxied to Orthanc."""
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    session = requests.Session()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, *args) -> None:
            pass

        def end_headers(self) -> None:
            # OHIF's web workers use SharedArrayBuffer, which needs a cross-origin isolated page.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith(("/dicom-web/", "/wado")):
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, APP_CONFIG.encode(), "application/javascript")
            elif path != "/" and (dist / path.lstrip("/")).is_file():
                super().do_GET()
            else:  # the app's own routes (/viewer, /) are index.html
                self._send(200, (dist / "index.html").read_bytes(), "text/html")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _proxy(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
            r = session.get(orthanc_url + self.path, headers={**headers, "Authorization": auth}, timeout=60)
            self._send(r.status_code, r.content, r.headers.get("Content-Type", "application/octet-stream"))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def store_studies(stack: Stack, tmp: Path) -> list[pydicom.Dataset]:
    """Three one-image US studies from the bundled samples, the third a prior of the first's patient; stored and
    indexed."""
    files = sorted(SAMPLES.glob("us_*.dcm"))[:3]
    made = []
    for i, f in enumerate(files):
        patient = i % 2
        ds = wrap_image(pydicom.dcmread(f).pixel_array, "US", patient_id=f"OHIF{patient:04d}",
                        patient_name=f"OHIF^{patient}",
                        patient_birth_date="19700101", patient_sex="F",
                        study_instance_uid=pydicom.uid.generate_uid(), study_date=f"2025010{i + 1}",
                        study_time="090000", accession_number=f"OHIF{i:04d}", study_description="OHIF SR check")
        path = tmp / f"study{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made.append((path, ds))
    result = storescu(stack.config, [p for p, _ in made])
    if result.returncode != 0:
        sys.exit(f"storescu failed: {result.stderr}")
    http, url = stack.http(), stack.config.orthanc_url
    deadline = time.monotonic() + 300
    while sum(c["instances"] for c in http.get(f"{url}/lookalike/status").json()["indexed"]) < len(made):
        if time.monotonic() > deadline:
            sys.exit("the studies were not indexed within 300 s")
        time.sleep(1)
    return [ds for _, ds in made]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ohif", type=Path, default=REPO / "var" / "ohif", help="where OHIF's bundle is kept")
    parser.add_argument("--screenshot", type=Path, default=REPO / "var" / "ohif_sr.png")
    parser.add_argument("--wait", type=float, default=25.0, help="seconds OHIF gets to draw the SR")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    dist = fetch_ohif(args.ohif)
    with tempfile.TemporaryDirectory() as tmp:
        config = StackConfig.create(Path(tmp) / "stack", extra_orthanc={"DicomWeb": {
            "Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"}})
        with Stack(config) as stack:
            studies = store_studies(stack, Path(tmp))
            http, url = stack.http(), config.orthanc_url
            query = next(x["ID"] for x in http.post(f"{url}/tools/lookup", data=str(studies[0].StudyInstanceUID))
                         .json() if x["Type"] == "Study")
            r = http.post(f"{url}/lookalike/studies/{query}/similar-report", json={"limit": 2}, timeout=120)
            r.raise_for_status()
            report = r.json()
            sr = pydicom.dcmread(io.BytesIO(http.get(f"{url}/instances/{report['report']}/file").content))
            print(f"SR {report['sop_instance_uid']} filed in study {studies[0].StudyInstanceUID}: "
                  f"{report['similar']} similar cases")
            r = http.post(f"{url}/lookalike/studies/{query}/similar-kos", json={}, timeout=120)
            r.raise_for_status()
            print(f"KOS filed in the same study and {len(r.json()['documents']) - 1} prior(s)")

            server, origin = serve_ohif(dist, url, "admin", config.admin_password)
            viewer = (f"{origin}/viewer?StudyInstanceUIDs={studies[0].StudyInstanceUID}"
                      f"&SeriesInstanceUIDs={report['series_instance_uid']}")
            print(f"OHIF {OHIF_VERSION}: {viewer}")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(viewer, wait_until="domcontentloaded")
                label = CODES.SIMILARITY_RANK.meaning
                try:
                    page.get_by_text(label).first.wait_for(timeout=args.wait * 1000)
                except Exception:
                    print(f"'{label}' did not appear within {args.wait:.0f} s")
                page.wait_for_timeout(2000)
                text = page.inner_text("body")
                args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshot), full_page=True)
                # The whole study: does the study panel list the KOS series beside the images and the SR?
                page.goto(viewer.partition("&SeriesInstanceUIDs")[0], wait_until="domcontentloaded")
                try:
                    page.get_by_text(KOS_SERIES_DESCRIPTION).first.wait_for(timeout=args.wait * 1000)
                except Exception:
                    pass
                page.wait_for_timeout(2000)
                study_text = page.inner_text("body")
                page.screenshot(path=str(args.screenshot.with_name(args.screenshot.stem + "_study.png")))
                browser.close()
            server.shutdown()

    expected = _expected_items(sr)
    # OHIF writes each item as "label: value" (a NUM with its unit after the value).
    missing = [(name, value) for name, value in expected if f"{name}: {value}" not in text]
    print(f"page shows {len(expected) - len(missing)} of {len(expected)} items of the similar-case containers as "
          "'label: value'")
    for name, value in missing:
        print(f"  missing: {name} = {value}")
    listed = KOS_SERIES_DESCRIPTION in study_text
    print(f"the KOS series '{KOS_SERIES_DESCRIPTION}' is {'' if listed else 'not '}listed in OHIF's study panel "
          "when the whole study is opened")
    if errors:
        print(f"page errors: {errors[:3]}")
    args.screenshot.with_suffix(".txt").write_text(text)
    print(f"screenshot: {args.screenshot}; page text: {args.screenshot.with_suffix('.txt')}")


def _expected_items(sr: pydicom.Dataset) -> list[tuple[str, str]]:
    """(label, value) of each TEXT, NUM and UIDREF item of the SR's similar-case containers."""
    items = []
    for container in sr.ContentSequence:
        for item in container.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "NUM":
                items.append((name, str(item.MeasuredValueSequence[0].NumericValue)))
            elif item.ValueType == "UIDREF":
                items.append((name, str(item.UID)))
            elif item.ValueType == "TEXT":
                items.append((name, str(item.TextValue)))
    return items


if __name__ == "__main__":
    main()
