"""``python -m dit_jax.demo`` end to end: the demo runs as its own process on a tiny random class-conditional DiT in
the quickstart's layout (16×16 greyscale, pixel space), and a real headless Chromium (Selenium + chromedriver) fills
the form, clicks Generate and gets the image; the JSON errors, the one-at-a-time lock and a model-free ``--help`` are
checked beside it. Videos likewise: a second demo process serves a tiny random Wan 2.1 model directory (pixel space,
greyscale, the video quickstart's 4 frames of 16×16) with a tiny random UMT5 text encoder, and the browser gets the
animated GIF (and the MP4); a model without a text encoder is served with the prompts its run trained on. The browser
tests are skipped only where /usr/bin/chromium is absent (CI installs it)."""

import base64
import dataclasses
import io
import json
import queue
import re
import shlex
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from subprocess_env import REPO, cpu_env

from dit_jax import pipelines
from dit_jax.checkpoint import save_model
from dit_jax.data import moving_digits as md
from dit_jax.demo import Demo, make_server, table_prompts
from dit_jax.encoders.t5 import T5Config
from dit_jax.models import DiTConfig, abstract_params, init_params
from dit_jax.models.wan import WanConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CONFIG = DiTConfig(
    input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False
)
REQUEST = dict(class_id=3, steps=4, guidance=2.5, seed=7)
# the video quickstart's layout (4 frames of 16×16, greyscale, pixel space, patches 1×4×4) at a smaller width
WAN = WanConfig(
    input_size=16, input_frames=4, patch_size=4, in_channels=1, out_channels=1, hidden_size=32, num_heads=2, depth=2,
    ffn_dim=64, text_dim=16, freq_dim=16, rope_max_seq_len=16,
)  # fmt: skip
VIDEO_REQUEST = dict(prompt="a cat", num_frames=5, height=16, width=24, steps=3, guidance=4.0, seed=7)
needs_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model directory with random weights (no zero layers: the image depends on class, seed and steps)."""
    path = tmp_path_factory.mktemp("demo") / "model"
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda x: (rs.randn(*x.shape) * 0.3).astype(np.float32), init_params(CONFIG, 0))
    save_model(path, CONFIG, params)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    return pipelines.load(model_dir)


def random_params(config, seed: int) -> dict:
    """Normal(0, 0.3) parameters of ``config``'s shapes (no zero layers; no init to compile)."""
    from dit_jax.runs import unbox_abstract

    rs = np.random.RandomState(seed)
    shapes = unbox_abstract(abstract_params(config))
    return jax.tree.map(lambda x: (rs.randn(*x.shape) * 0.3).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def video_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """``(Wan model directory, UMT5 folder)``: random weights; the UMT5 folder holds a dit_jax model directory in
    ``text_encoder/`` and a tiny T5 tokenizer in ``tokenizer/``."""
    from test_t5 import tiny_tokenizer

    root = tmp_path_factory.mktemp("video_demo")
    save_model(root / "wan", WAN, random_params(WAN, 1))
    tokenizer = tiny_tokenizer()
    t5 = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  model_type="umt5", relative_bias_per_layer=True)  # fmt: skip
    save_model(root / "umt5" / "text_encoder", t5, random_params(t5, 2))
    tokenizer.save_pretrained(root / "umt5" / "tokenizer")
    return root / "wan", root / "umt5"


@pytest.fixture(scope="module")
def video_pipe(video_dirs):
    return pipelines.load(video_dirs[0], text_encoder=video_dirs[1])


class DemoProcess:
    """``python -m dit_jax.demo MODEL --port 0`` as a subprocess; ``url`` waits for the line that announces it (so
    the browser and the in-process pipeline start while the demo loads)."""

    def __init__(self, model_dir: Path, log: Path, *args: str):
        cmd = [sys.executable, "-m", "dit_jax.demo", str(model_dir), "--host", "127.0.0.1", "--port", "0", *args]
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(1), stdout=subprocess.PIPE, stderr=err, text=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(ln) for ln in self.proc.stdout], daemon=True).start()
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            try:
                line = self._lines.get(timeout=120)
            except queue.Empty:
                line = ""
            if "http://" not in line:
                pytest.fail(f"the demo did not start: {line!r}\n{self.log.read_text()}")
            self._url = line[line.index("http://") :].split()[0]
        return self._url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def demo(model_dir, tmp_path_factory):
    process = DemoProcess(model_dir, tmp_path_factory.mktemp("demo_log") / "stderr.txt")
    yield process
    process.stop()
    print(process.log.read_text())


@pytest.fixture(scope="module")
def video_demo(video_dirs, tmp_path_factory):
    wan, umt5 = video_dirs
    process = DemoProcess(wan, tmp_path_factory.mktemp("video_demo_log") / "stderr.txt", "--text-encoder", str(umt5))
    yield process
    process.stop()
    print(process.log.read_text())


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def post(url: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "api/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def fill(driver, values: dict) -> None:
    """Type each value into its form field (select the class) as a user would, then click Generate."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        if field.tag_name == "select":
            Select(field).select_by_value(str(value))
        else:
            field.clear()
            field.send_keys(str(value))
    driver.find_element(By.ID, "generate").click()


def open_page(driver, url: str) -> None:
    """Load the demo page and wait until it is there (on a busy host the first load can come back before the
    document has its title); one reload if it still is not, then a timeout fails the test."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    has_title = lambda d: "dit_jax demo" in d.title  # noqa: E731
    driver.get(url)
    try:
        WebDriverWait(driver, 30, poll_frequency=0.1).until(has_title)
    except TimeoutException:
        driver.get(url)
        WebDriverWait(driver, 60, poll_frequency=0.1).until(has_title)


def wait_state(driver) -> str:
    """Wait until the page says the request finished (``done`` or ``error``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    state = lambda d: d.execute_script("return document.body.dataset.state")  # noqa: E731
    WebDriverWait(driver, 120, poll_frequency=0.1).until(lambda d: state(d) in ("done", "error"))
    return state(driver)


def browser_fetch(driver, link) -> bytes:
    """The bytes the browser gets from a link's URL (as its download would)."""
    fetched = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0].href).then(r => r.arrayBuffer()).then(b => {
          let s = ""; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); done(btoa(s));
        }).catch(e => done("failed: " + e));""",
        link,
    )
    return base64.b64decode(fetched)


def test_help_loads_nothing():
    """``--help`` answers at once: only the standard library is imported (no JAX, no model)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "dit_jax.demo", "--help"]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("MODEL_OR_WORKDIR", "--host", "--port", "--dtype", "--vae", "--text-encoder", "--fps", "--quantize",
                 "--offload"):  # fmt: skip
        assert flag in proc.stdout
    modules = {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in proc.stderr.splitlines() if "|" in ln}
    assert "dit_jax" in modules and not modules & {"jax", "numpy", "flax", "PIL", "torch"}


@needs_browser
def test_browser_generates_and_downloads_the_image(demo, browser, pipe):
    from selenium.webdriver.common.by import By

    open_page(browser, demo.url)
    options = browser.find_elements(By.CSS_SELECTOR, "#class_id option")
    assert [o.get_attribute("value") for o in options] == [str(i) for i in range(10)]
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "50"  # the model directory's DDIM default
    fill(browser, REQUEST)
    assert wait_state(browser) == "done", browser.find_element(By.ID, "error").text
    # the image element holds a decoded PNG of the model's size
    image = browser.find_element(By.ID, "image")
    size = browser.execute_script("const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight]", image)
    assert size == [True, 16, 16]
    # the progress bar followed the pipeline's progress callback to the end of the trajectory
    bar = browser.find_element(By.ID, "progress")
    calls = pipe.trajectory(REQUEST["steps"]).num_model_calls
    assert float(bar.get_attribute("max")) == float(bar.get_attribute("value")) == calls
    assert f"{calls}/{calls}" in browser.find_element(By.ID, "status").text

    # the download link serves the bytes the image element shows, as a PNG file name
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("download") == "class3_seed7.png"
    assert link.text == "Download PNG" and not browser.find_elements(By.ID, "download-mp4")
    data = browser_fetch(browser, link)
    with urllib.request.urlopen(image.get_attribute("src"), timeout=30) as r:
        assert r.headers["Content-Type"] == "image/png"
        assert r.read() == data
    png = Image.open(io.BytesIO(data))
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and png.format == "PNG" and png.mode == "L" and png.size == (16, 16)
    got = np.asarray(png).astype(int)
    # what the browser decoded (drawn on a canvas) is that PNG
    shown = browser.execute_script(
        """const i = arguments[0], c = document.createElement("canvas");
        c.width = i.naturalWidth; c.height = i.naturalHeight;
        const g = c.getContext("2d"); g.drawImage(i, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data).filter((_, k) => k % 4 === 0);""",
        image,
    )
    assert np.abs(np.asarray(shown).reshape(16, 16) - got).max() <= 1
    # and it is the pipeline's image for that request
    kwargs = dict(num_inference_steps=REQUEST["steps"], guidance_scale=REQUEST["guidance"], seed=REQUEST["seed"])
    kwargs.update(progress=lambda i, n: None)  # the compiled sampler is the one the demo's lock test reuses
    want = pipelines.to_uint8(pipe([REQUEST["class_id"]], **kwargs))[0, ..., 0].astype(int)
    assert got.std() > 0 and np.abs(got - want).max() <= 1


@needs_browser
def test_browser_shows_a_bad_request(demo, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, demo.url)
    fill(browser, dict(REQUEST, steps=0))
    assert wait_state(browser) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text == "steps=0: expected an integer from 1 to 1000"
    assert not browser.find_element(By.ID, "result").is_displayed()
    assert browser.find_element(By.ID, "generate").is_enabled()  # the page can try again


def gif_frames(data: bytes) -> np.ndarray:
    """The frames of an animated GIF as (F, H, W) greyscale uint8 (every frame drawn in full)."""
    gif = Image.open(io.BytesIO(data))
    frames = []
    for k in range(gif.n_frames):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("L")))
    return np.stack(frames)


@needs_browser
def test_browser_generates_and_downloads_a_video(video_demo, browser, video_pipe):
    from selenium.webdriver.common.by import By

    open_page(browser, video_demo.url)
    assert (
        "dit_jax demo — Wan" in browser.title and "text-to-video" in browser.find_element(By.CLASS_NAME, "source").text
    )
    assert browser.find_element(By.ID, "prompt").tag_name == "textarea"
    # the defaults: the model's own clip (pixel space) and the Wan sampler's steps
    defaults = {k: browser.find_element(By.ID, k).get_attribute("value") for k in ("num_frames", "height", "steps")}
    assert defaults == {"num_frames": "4", "height": "16", "steps": "50"}
    fill(browser, VIDEO_REQUEST)
    assert wait_state(browser) == "done", browser.find_element(By.ID, "error").text
    # the page shows the animated GIF at the requested size
    image = browser.find_element(By.ID, "image")
    size = browser.execute_script("const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight]", image)
    assert size == [True, 24, 16]
    calls = video_pipe.trajectory(VIDEO_REQUEST["steps"], num_frames=5, height=16, width=24).num_model_calls
    bar = browser.find_element(By.ID, "progress")
    assert float(bar.get_attribute("max")) == float(bar.get_attribute("value")) == calls
    assert "24 × 16 px, 5 frames at 16 fps" in browser.find_element(By.ID, "caption").text

    # the GIF download: the bytes the page shows, 5 frames of 24×16, the pipeline's video for that request
    link = browser.find_element(By.ID, "download")
    assert (link.text, link.get_attribute("download")) == ("Download GIF", "a-cat_seed7.gif")
    data = browser_fetch(browser, link)
    with urllib.request.urlopen(image.get_attribute("src"), timeout=30) as r:
        assert r.headers["Content-Type"] == "image/gif" and r.read() == data
    assert data[:6] == b"GIF89a" and Image.open(io.BytesIO(data)).info["loop"] == 0  # loops forever
    got = gif_frames(data).astype(int)
    assert got.shape == (5, 16, 24)
    kwargs = {k: VIDEO_REQUEST[k] for k in ("num_frames", "height", "width", "seed")}
    kwargs.update(num_inference_steps=VIDEO_REQUEST["steps"], guidance_scale=VIDEO_REQUEST["guidance"])
    want = pipelines.to_uint8(video_pipe(VIDEO_REQUEST["prompt"], **kwargs))[0, ..., 0].astype(int)
    assert np.abs(got - want).max() <= 1 and np.abs(np.diff(want, axis=0)).max() > 0  # the frames differ

    # the MP4 download (imageio-ffmpeg is installed here): an H.264 file of the same frames
    import imageio_ffmpeg

    mp4 = browser.find_element(By.ID, "download-mp4")
    assert (mp4.text, mp4.get_attribute("download")) == ("Download MP4", "a-cat_seed7.mp4")
    data = browser_fetch(browser, mp4)
    assert data[4:8] == b"ftyp"
    path = video_demo.log.parent / "a-cat_seed7.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(16, 24, 3) for f in reader]
    assert meta["size"] == (24, 16) and meta["fps"] == 16 and len(frames) == 5
    assert np.abs(np.stack(frames)[..., 0].astype(int) - want).mean() < 8  # lossy, close


def test_video_api_info_and_bad_requests(video_demo):
    with urllib.request.urlopen(video_demo.url + "api/info", timeout=30) as r:
        info = json.load(r)
    assert (info["task"], info["media"], info["formats"]) == ("text-to-video", "video", ["gif", "mp4"])
    assert (info["num_frames"], info["height"], info["width"], info["size_multiple"]) == (4, 16, 16, 4)
    assert (info["min_frames"], info["frame_step"], info["fps"]) == (1, 1, 16.0)  # pixel space: any frame count
    assert info["fields"] == ["prompt", "height", "width", "num_frames", "steps", "guidance", "seed"]
    for body, message in [
        (dict(VIDEO_REQUEST, num_frames=0), "num_frames=0: expected an integer from 1 to 1024"),
        (dict(VIDEO_REQUEST, height=10), "height and width must be multiples of 4"),
        (dict(VIDEO_REQUEST, prompt=" "), "prompt is empty: write what the video should show"),
        (dict(REQUEST), "unknown field(s) ['class_id']: this text-to-video model takes prompt, height"),
    ]:
        status, reply = post(video_demo.url, body)
        assert status == 400 and reply["error"].startswith(message), reply
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(video_demo.url + "video/0123456789abcdef.gif", timeout=30)
    assert e.value.code == 404


def test_a_video_model_without_text_encoder_is_served_with_its_prompts(video_pipe, video_dirs, pipe, monkeypatch):
    """A text-to-video model that trained on prompt features made without a text encoder (a moving-digits run: one
    token, digit and direction channels hot) offers its prompts as a list and samples from their features, with the
    zero null prompt of its training for guidance. Without imageio-ffmpeg the video is offered as a GIF only."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    text_free = dataclasses.replace(video_pipe, text_encoder=None)
    assert not text_free.encoders
    table = {md.prompt_text(d, k): md.prompt_context([d], [k], 16, 1)[0] for d in range(10) for k in range(4)}
    app = Demo(text_free, prompts=table)
    info = app.info()
    assert info["prompts"][:2] == ["digit 0 moving right", "digit 0 moving left"] and info["formats"] == ["gif"]
    page = app.page()
    assert '<select id="prompt" name="prompt"><option value="digit 0 moving right">' in page
    assert '<option value="digit 9 moving up">digit 9 moving up</option></select>' in page
    status, reply = app.generate(dict(prompt="digit 3 moving left", steps=2, seed=1))
    assert status == 200 and reply["filename"] == "digit-3-moving-left_seed1.gif" and reply["num_frames"] == 4
    assert [d["format"] for d in reply["downloads"]] == ["GIF"]
    got = gif_frames(app.file(reply["url"])[0]).astype(int)
    context = table["digit 3 moving left"][None]
    kwargs = dict(num_inference_steps=2, seed=1, num_frames=4, height=16, width=16)
    want = text_free(prompt_embeds=context, negative_prompt_embeds=np.zeros_like(context), **kwargs)
    other = text_free(
        prompt_embeds=table["digit 5 moving up"][None], negative_prompt_embeds=np.zeros_like(context), **kwargs
    )
    want, other = (pipelines.to_uint8(v)[0, ..., 0].astype(int) for v in (want, other))
    assert got.shape == (4, 16, 16) and np.abs(got - want).max() <= 1 and np.abs(other - want).max() > 1
    for prompt in ("digit 3 moving sideways", ["digit 3 moving left"]):
        status, reply = app.generate(dict(prompt=prompt))
        shown = prompt if isinstance(prompt, str) else repr(prompt)
        assert status == 400 and reply["error"].startswith(
            f"prompt={shown}: expected one of the 40 prompts this model was trained on"
        ), reply
    assert table_prompts(text_free) is None  # a pipeline without a prompt table names no prompts
    with pytest.raises(ValueError, match="prompts= applies to text-to-video models"):
        Demo(pipe, prompts=table)  # an image model


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "the request body is not valid JSON"),
        ([1, 2], "the request body must be a JSON object"),
        (dict(REQUEST, class_id=10), "class_id=10: expected an integer from 0 to 9"),
        (dict(REQUEST, steps="four"), "steps=four: expected an integer from 1 to 1000"),
        (dict(REQUEST, guidance="-1"), "guidance=-1: expected a number ≥ 0"),
        (dict(REQUEST, steps=""), "steps='': expected an integer from 1 to 1000"),
        (dict(REQUEST, seed=2**40), "seed=1099511627776: expected an integer from 0 to 2147483647"),
        (dict(prompt="a cat"), "unknown field(s) ['prompt']: this class-conditional model takes class_id"),
    ],
)
def test_bad_requests_are_one_json_error(demo, body, message):
    status, reply = post(demo.url, body)
    assert status == 400 and reply["error"].startswith(message), reply


def test_readme_commands_parse():
    """The README's web demo commands use flags the demo has."""
    from dit_jax.demo import _parser

    text = (Path(REPO) / "README.md").read_text()
    section = text[text.index("### Web demo") :]
    section = section[: section.index("\n#")]
    commands = re.findall(r"(?:^|`)(python -m dit_jax\.demo [^`\n]*)", section, re.M)
    assert len(commands) >= 2
    for command in commands:
        args = _parser().parse_args(shlex.split(command)[3:])
        assert args.source and args.port == 7860


def test_api_info_and_unknown_paths(demo):
    server = demo.url
    with urllib.request.urlopen(server + "api/info", timeout=30) as r:
        info = json.load(r)
    assert info["task"] == "class-to-image" and info["num_classes"] == 10
    assert (info["height"], info["width"], info["steps"], info["method"]) == (16, 16, 50, "ddim")
    for path in ("image/0123456789abcdef.png", "nothing"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server + path, timeout=30)
        assert e.value.code == 404 and "not found" in json.load(e.value)["error"]


def test_one_generation_at_a_time(pipe):
    """While a generation holds the lock, another request gets HTTP 503 "busy" (and runs once it is free)."""
    app = Demo(pipe)
    httpd = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        with app.lock:
            status, reply = post(url, REQUEST)
        assert status == 503 and reply["error"].startswith("busy: another image is being generated"), reply
        status, reply = post(url, REQUEST)
        assert status == 200 and reply["filename"] == "class3_seed7.png" and (reply["step"], reply["total"]) == (4, 4)
        with urllib.request.urlopen(url + reply["url"].lstrip("/"), timeout=30) as r:
            assert Image.open(io.BytesIO(r.read())).size == (16, 16)
        assert app.progress()["busy"] is False and not app.lock.locked()
    finally:
        httpd.shutdown()
        httpd.server_close()
