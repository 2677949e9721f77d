"""`motiontune ui`: the web app end to end in headless Chromium (Debian's, driven by Playwright), files served
only from inside the workspace and output folders, the watch API on a run started elsewhere, and the bind rules.

Screenshots of each page are written to tests/artifacts/ui/ (git-ignored)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA

# one browser session (the `ui` fixture) is shared by these tests in order, later ones reading what earlier ones
# made: they run on one xdist worker (`make test` uses --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ui")

ARTIFACTS = Path(__file__).parent / "artifacts" / "ui"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(autouse=True)
def on_the_group_worker(request):
    """pytest-xdist keeps a group on one worker by adding `@group` to each test's id; where it cannot (pytest 9.2
    with xdist 3.8) it spreads the group over the workers, and tests reading an earlier one's runs fail
    obscurely. Fail with the cause instead."""
    if getattr(request.config.option, "loadgroup", False) and not request.node.nodeid.endswith("@ui"):
        pytest.fail("pytest-xdist could not keep the ui tests on one worker with this pytest: install the versions "
                    "pinned in constraints.txt (make install)")


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when it is missing and we are root."""
    if CHROMIUM.exists():
        return CHROMIUM
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
                    "apt-get install -y chromium, then run again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"apt-get install chromium failed (offline?): {result.stderr[-500:]}")
    assert CHROMIUM.exists(), "apt-get installed chromium but /usr/bin/chromium is missing"
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """The UI app under uvicorn, in a thread of the test process."""

    def __init__(self, workspace=None, cwd: Path | None = None, browse: list[Path] | None = None):
        import uvicorn

        from motiontune.ui import create_app

        self.app = create_app(workspace, browse=browse)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the UI server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.app.state.run.kill_all()  # never leave a trainer behind
        self.server.should_exit = True
        self.thread.join(10)

    def raw_get(self, target: str) -> tuple[int, bytes]:
        """A request line sent exactly as written (no client-side `..` clean-up)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response.status, body


def tiny_training_config(tmp_path: Path, model: Path) -> dict:
    """The demo's tiny WAN setup, smaller: 64x48, 9-frame clips, a 5-frame sample every 2 steps, many epochs
    (the test stops the run)."""
    from motiontune.demo import demo_config

    config = demo_config(tmp_path)
    config.update(
        base_model_name=str(model), epochs=40, resolution="64x48", dataloader_threads=0, encode_in_child=False,
        sample_after=2, sample_after_unit="STEP", backup_after=0, backup_after_unit="NEVER",
        workspace_dir=str(tmp_path / "workspace"), cache_dir=str(tmp_path / "cache"),
        output_model_destination=str(tmp_path / "out" / "tiny-lora.safetensors"),
    )
    config["video_config"]["max_frames"] = 9
    config["samples"][0].update(frames=5, height=48, width=64, steps=2)
    return config


# ---------------------------------------------------------------------------------------------- in the browser
# One server and one browser for the module's browser tests (they share the server's working config and runs, in
# the order written); each page is opened at a desktop and a phone width where the test says so.

DESKTOP, PHONE = 1280, 390
# an estimate traces the released model at full size (about 20 s on a quiet machine, minutes while the other test
# worker trains beside it): waited for as long as it takes, within reason; a broken page still fails
ESTIMATE_WAIT = 600_000


class Browser:
    def __init__(self, server: LiveServer, browser, root: Path, model: Path, dataset: Path):
        self.server, self.browser, self.root, self.model, self.dataset = server, browser, root, model, dataset
        self.errors: list[str] = []

    def page(self, width: int = DESKTOP):
        page = self.browser.new_page(viewport={"width": width, "height": 900})
        page.set_default_timeout(60_000)  # clicks and waits under a loaded machine (see the ui fixture)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.goto(self.server.url)
        page.wait_for_selector("body[data-ready='1']")
        return page

    def reload(self, page):
        page.reload()
        page.wait_for_selector("body[data-ready='1']")

    def shot(self, page, name: str) -> None:
        page.evaluate("() => window.scrollTo(0, 0)")  # the sticky header at the top of a full-page capture
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def kept(self, check, why: str = "") -> None:
        """The working config the server keeps (written 300 ms after an edit) passes `check` (within a minute: a loaded machine)."""
        deadline = time.time() + 60
        while True:
            kept = json.loads((self.root / "home" / "ui-working.json").read_text())["config"]
            if check(kept):
                return
            assert time.time() < deadline, (why, kept)
            time.sleep(0.1)

    def config(self, **changes) -> dict:
        """The tiny WAN 2.1 run: 64x48, 9-frame clips of the module's dataset, a long run the tests stop."""
        data = tiny_training_config(self.root, self.model)
        data["concepts"] = [{"name": "clips", "path": str(self.dataset)}]
        data.update({"sample_after": 1000, "sample_after_unit": "STEP", "epochs": 300, **changes})
        return data

    def load(self, page, data: dict, name: str = "config.json") -> None:
        """Load a config file through the page, as a user does."""
        path = self.root / name
        path.write_text(json.dumps(data, indent=2))
        page.click("#tab-config")
        page.fill("#load-path", str(path))
        page.click("#load-file")
        from playwright.sync_api import expect

        expect(page.locator("#config-message")).to_contain_text(str(path))


def sideways_scroll(page) -> int:
    """How far the page scrolls sideways (0: none)."""
    return page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")


@pytest.fixture(scope="module")
def ui(chromium, tiny_models, tmp_path_factory):
    from playwright.sync_api import expect, sync_playwright

    # The other test worker trains beside these tests on two cores: a round trip to the server or the page's 1 s
    # poll can take longer than Playwright's 5 s default. A broken page still fails, only later.
    expect.set_options(timeout=30_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("ui")
    dataset = root / "dataset"
    dataset.mkdir()
    for name in ("shapes_200px_30fps.mp4", "big_buck_bunny_432_433.webm"):
        shutil.copy(DATA / name, dataset / name)
    (dataset / "shapes_200px_30fps.txt").write_text("moving shapes\n")
    (dataset / "broken.mp4").write_bytes(b"this is not a video" * 10)
    with LiveServer(root / "home", browse=[root]) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        session = Browser(server, browser, root, tiny_models("wan-2.1"), dataset)
        try:
            yield session
        finally:
            browser.close()
    assert not session.errors, session.errors


def test_first_impression_help_and_fields(ui):
    """Before anything is done: no problem count, an empty state; `__version` not a field, no "null" in empty
    fields, train_dtype offering only what is accepted; help with units and rounding beside the fields."""
    from playwright.sync_api import expect

    for width in (DESKTOP, PHONE):
        page = ui.page(width)
        expect(page.locator("#config-status")).to_have_text("no config loaded")
        assert "bad" not in page.locator("#config-status").get_attribute("class")
        expect(page.locator("#empty-state")).to_be_visible()
        expect(page.locator("#general-errors li")).to_have_count(0)
        assert page.locator("#field-__version").count() == 0
        texts = page.evaluate("""() => [...[...document.querySelectorAll('#config-form input')].flatMap(n => [n.value, n.placeholder]),
            ...[...document.querySelectorAll('#config-form option')].map(o => o.text)]""")
        assert "null" not in texts and not any("null" in t.split() for t in texts)
        page.click("#group-model")
        options = page.locator("#field-train_dtype option").all_text_contents()
        assert options == ["FLOAT_32", "BFLOAT_16", "FLOAT_16"]
        expect(page.locator('.field[data-path="lora_rank"]')).to_be_hidden()  # in the Training group
        page.click("#group-training")
        expect(page.locator('.field[data-path="lora_rank"] .help')).to_contain_text("1 – 1024")
        expect(page.locator('.field[data-path="learning_rate"] .help')).to_contain_text("> 0")
        page.click("#group-data")
        page.locator('details[data-path="video_config"] > summary').click()
        expect(page.locator('.field[data-path="video_config.max_frames"] .help')).to_contain_text("4n+1")
        expect(page.locator('.field[data-path="video_config.target_fps"] .help')).to_contain_text("frames per second")
        expect(page.locator('.field[data-path="video_config.max_duration"] .help')).to_contain_text("> 0 s")
        for group in ("general", "model", "data", "concepts", "training", "sampling", "backup", "tools"):
            page.click(f"#group-{group}")
            assert sideways_scroll(page) == 0, (width, group)
        ui.shot(page, f"1-first-impression-{width}")
        page.close()


def test_typos_unknown_keys_combinations_and_warnings(ui):
    """A file with a typo'd choice, an unknown key, a combination that cannot work and a warm-up longer than the
    run: all shown at once, the typed value kept visible, "did you mean" with a one-click fix, unknown keys
    renamed or removed, integers asked for in words."""
    from playwright.sync_api import expect

    data = ui.config(learning_rate_scheduler="COSINUS", lora_rnak=8, bogus=1, learning_rate_warmup_steps=5000, epochs=2)
    data["vae"] = {"train": True}
    data["video_config"]["spatial_compression_ratio"] = 4  # below the VAE's own 8: changes nothing
    page = ui.page()
    ui.load(page, data, "typos.json")
    expect(page.locator("#config-status")).to_have_text("4 problem(s) in the config")
    page.click("#group-training")
    scheduler = page.locator("#field-learning_rate_scheduler")
    expect(scheduler).to_have_value('"COSINUS"')
    expect(scheduler.locator("option:checked")).to_have_text("COSINUS (not valid)")
    expect(page.locator('[data-error-for="learning_rate_scheduler"]')).to_contain_text("did you mean 'COSINE'")
    expect(page.locator('[data-error-for="vae.train"]')).to_contain_text("not supported yet")  # with the schema's errors
    expect(page.locator('[data-warning-for="learning_rate_warmup_steps"]')).to_contain_text("longer than the run")
    page.click("#group-data")
    expect(page.locator('[data-warning-for="video_config.spatial_compression_ratio"]')).to_contain_text("changes nothing")
    page.click("#group-training")
    unknown = page.locator("#unknown-keys li")
    expect(unknown).to_have_count(2)
    expect(page.locator('#unknown-keys li[data-key="lora_rnak"]')).to_contain_text("= 8")
    expect(page.locator('#unknown-keys li[data-key="lora_rnak"]')).to_contain_text("did you mean 'lora_rank'")
    ui.shot(page, "2-typos")
    page.click('[data-error-for="learning_rate_scheduler"] button.fix')
    expect(scheduler).to_have_value('"COSINE"')
    page.click('#unknown-keys li[data-key="lora_rnak"] button.rename-key')
    expect(page.locator("#field-lora_rank")).to_have_value("8")
    page.click('#unknown-keys li[data-key="bogus"] button.remove-key')
    expect(page.locator("#unknown-keys")).to_be_hidden()
    page.fill("#field-epochs", "1.5")
    expect(page.locator('[data-error-for="epochs"]')).to_have_text("enter a whole number (got 1.5)")
    page.fill("#field-epochs", "abc")
    expect(page.locator('[data-error-for="epochs"]')).to_have_text('enter a whole number (got "abc")')
    page.fill("#field-epochs", "2")
    page.click("#group-model")
    page.locator('details[data-path="vae"]').evaluate("d => d.open = true")
    page.uncheck("#field-vae-train")
    expect(page.locator("#config-status")).to_have_text("config valid")
    ui.kept(lambda kept: kept["learning_rate_scheduler"] == "COSINE" and kept["lora_rank"] == 8
            and "lora_rnak" not in kept and "bogus" not in kept)
    page.close()


def test_missing_paths_are_flagged_before_start(ui):
    from playwright.sync_api import expect

    page = ui.page(PHONE)
    data = ui.config()
    data["concepts"][0]["path"] = str(ui.root / "no-such-folder")
    ui.load(page, data, "missing.json")
    page.click("#group-concepts")
    expect(page.locator('[data-error-for="concepts.0.path"]')).to_contain_text("no-such-folder: no such folder")
    page.click("#group-model")
    page.fill("#field-base_model_name", str(ui.root / "no-model"))
    expect(page.locator('[data-error-for="base_model_name"]')).to_contain_text("no such folder or file")
    page.fill("#field-base_model_name", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")  # a Hub id is not a local path
    expect(page.locator('[data-error-for="base_model_name"]')).to_have_text("")
    ui.shot(page, "3-missing-path-390")
    page.click("#tab-training")
    expect(page.locator("#start-training")).to_be_disabled()
    expect(page.locator("#start-hint")).to_contain_text("fix the config's problems")
    refused = page.request.post(f"{ui.server.url}/api/train/start", data={"config": data})
    assert refused.status == 422 and "no such folder" in refused.text()
    assert not (ui.root / "workspace" / "runs").exists()
    page.close()


def test_estimate_panel_applies_the_cheapest_change_that_fits(ui):
    """The WAN 2.1 preset on an 8 GB card (the released model's config, no weights): it does not fit; the
    cheapest change, applied in one click, makes the estimate fit."""
    from playwright.sync_api import expect

    page = ui.page()
    page.select_option("#preset-select", "#wan 2.1 LoRA")
    page.click("#load-preset")
    page.click("#group-model")
    page.fill("#estimate-gpu", "8")
    page.click("#estimate-run")
    expect(page.locator("#estimate-result")).to_contain_text("does not fit 8 GB", timeout=ESTIMATE_WAIT)
    first = page.locator("#estimate-changes li").first
    expect(first).to_contain_text("GB")
    change = first.text_content()
    first.locator("button.apply-change").click()
    expect(page.locator("#estimate-result")).to_contain_text("fits 8 GB", timeout=ESTIMATE_WAIT)
    expect(page.locator("#estimate-panel")).to_have_attribute("data-fits", "yes")
    # the change is in the config, and kept by the server
    ui.kept(lambda kept: kept["transformer"] != {"train": True, "gradient_checkpointing": True}, change)
    ui.shot(page, "4-estimate")
    page.close()


def _held(page, pattern: str) -> list:
    """Requests matching `pattern` are held (not sent on) until the test releases them with `.continue_()`: the
    order of replies is the test's, whatever the machine's load."""
    held = []
    page.route(pattern, lambda route: held.append(route))
    return held


def _wait_held(page, held: list, count: int = 1) -> None:
    deadline = time.monotonic() + 120  # a bound for a page that never asks, not a timing the test relies on
    while len(held) < count:  # the route handler runs while Playwright waits: a state, not a delay
        assert time.monotonic() < deadline, "the page never sent the request"
        page.wait_for_timeout(20)


def _estimates_sent(page) -> list[dict]:
    sent = []
    page.on("request", lambda request: sent.append(request.post_data_json) if request.url.endswith("/api/estimate") else None)
    return sent


def test_an_estimate_asked_while_a_preset_loads_is_of_that_preset(ui):
    """Race one: a small config in the form, Load preset (its reply held back), Estimate at once: the estimate
    waits for the preset and is of it (832x480), never of the form being replaced."""
    from playwright.sync_api import expect

    page = ui.page()
    ui.load(page, ui.config(), "small-before-preset.json")  # 64x48, 9 frames
    sent = _estimates_sent(page)
    held = _held(page, "**/api/presets/*")
    page.select_option("#preset-select", "#wan 2.1 LoRA")
    page.click("#load-preset")
    _wait_held(page, held)
    page.click("#group-model")
    page.fill("#estimate-gpu", "24")
    page.click("#estimate-run")
    held[0].continue_()
    expect(page.locator("#estimate-result")).to_contain_text("GB on the GPU (", timeout=ESTIMATE_WAIT)
    expect(page.locator("#estimate-result")).to_contain_text("832x480")
    expect(page.locator("#estimate-result")).not_to_contain_text("64x48")
    assert [body["config"]["resolution"] for body in sent] == ["832x480"], sent
    page.close()


def test_an_estimate_of_a_replaced_config_is_marked_out_of_date_and_cannot_be_applied(ui):
    """Race two: Estimate `#wan 2.1 LoRA` on an 8 GB card (its reply held back), load a small config file
    meanwhile, then let the old reply arrive: it is dropped, the panel says to estimate again, and no "apply"
    button can put the preset's settings back. Then an estimate shown with its changes, and a file loaded after
    it: the changes go with the config they were for."""
    from playwright.sync_api import expect

    page = ui.page()
    page.select_option("#preset-select", "#wan 2.1 LoRA")
    page.click("#load-preset")
    expect(page.locator("#config-message")).to_contain_text("preset #wan 2.1 LoRA")
    page.click("#group-model")
    page.fill("#estimate-gpu", "8")
    held = _held(page, "**/api/estimate")
    page.click("#estimate-run")
    _wait_held(page, held)
    ui.load(page, ui.config(), "small-after-estimate.json")
    held[0].continue_()
    expect(page.locator("#estimate-panel")).to_have_attribute("data-dropped", "1", timeout=ESTIMATE_WAIT)
    expect(page.locator("#estimate-panel")).to_have_attribute("data-state", "stale")
    expect(page.locator("#estimate-result")).to_contain_text("estimate again")
    expect(page.locator("#estimate-changes li")).to_have_count(0)
    expect(page.locator("#field-resolution")).to_have_value("64x48")

    page.unroute("**/api/estimate")
    page.click("#load-preset")
    expect(page.locator("#field-resolution")).to_have_value("832x480")
    page.click("#group-model")
    page.click("#estimate-run")
    expect(page.locator("#estimate-result")).to_contain_text("does not fit 8 GB", timeout=ESTIMATE_WAIT)
    assert page.locator("#estimate-changes button.apply-change").count() > 0
    ui.load(page, ui.config(), "small-after-estimate.json")
    expect(page.locator("#estimate-panel")).to_have_attribute("data-state", "stale")
    expect(page.locator("#estimate-changes li")).to_have_count(0)
    expect(page.locator("#field-resolution")).to_have_value("64x48")
    ui.kept(lambda kept: kept["resolution"] == "64x48")
    page.close()


def test_a_preset_without_its_concepts_file_says_what_to_do_and_adding_a_concept_says_what_it_replaced(ui):
    """The recommended preset names OneTrainer's training_concepts/concepts.json, which a new user does not have:
    the problem count leads to it in one click, the message and the Concepts tab say what to do, and adding a
    concept says that it replaces concept_file_name (it was dropped silently)."""
    from playwright.sync_api import expect

    page = ui.page()
    ui.load(page, ui.config(), "mine.json")
    expect(page.locator("#save-path")).to_have_value(str(ui.root / "mine.json"))
    page.select_option("#preset-select", "#wan 2.1 LoRA")
    page.click("#load-preset")
    expect(page.locator("#config-status")).to_have_text("1 problem(s) in the config")
    # Save no longer overwrites the file loaded before the preset: it asks for a name
    expect(page.locator("#save-path")).to_have_value("")
    page.click("#save-file")
    expect(page.locator("#config-message")).to_contain_text("name the file to save as first")
    assert json.loads((ui.root / "mine.json").read_text())["resolution"] == "64x48"
    page.click("#group-general")
    page.click("#config-status")
    error = page.locator('[data-error-for="concept_file_name"]')
    expect(error).to_be_visible()
    expect(error).to_contain_text("training_concepts/concepts.json: no such file: create it, or list your folders in the Concepts tab")
    page.click("#group-concepts")
    expect(page.locator("#concepts-from-file")).to_contain_text("reads its concepts from training_concepts/concepts.json")
    page.locator('details[data-path="concepts"] button.add').click()
    expect(page.locator("#config-message")).to_contain_text("instead of in training_concepts/concepts.json (concept_file_name)")
    expect(page.locator("#concepts-from-file")).to_have_count(0)
    ui.kept(lambda kept: "concept_file_name" not in kept and len(kept["concepts"]) == 1)
    page.close()


def test_find_a_key_shows_every_offloading_key_across_groups(ui):
    """About 200 inputs in eight groups: typing "offload" shows every key whose name or help says it, from every
    group at once (sections opened), and nothing else; clearing the search gives the groups back."""
    from playwright.sync_api import expect

    from motiontune.ui.schema_help import schema_keys, ui_schema

    from motiontune.configure import keys_that_do_not_apply, validate

    offloading = {".".join(map(str, path)) for path, prop in schema_keys(ui_schema())
                  if "offload" in ".".join(map(str, path)) and 0 not in path and "properties" not in prop}
    unused = keys_that_do_not_apply(validate(ui.config()))  # WAN 2.1 has no second expert: transformer_2's keys
    wanted = {key for key in offloading if key.split(".")[0] not in unused}
    assert wanted and wanted != offloading, (wanted, unused)
    page = ui.page()
    ui.load(page, ui.config(), "search.json")
    page.click("#group-training")
    page.fill("#key-search", "offload")
    expect(page.locator("#key-search-count")).to_contain_text("key(s) found")
    expect(page.locator("#key-search-count")).to_contain_text(f"and {len(offloading - wanted)} that do not apply")
    shown = set(page.evaluate("() => [...document.querySelectorAll('#config-form .field')].filter(f => f.offsetParent !== null).map(f => f.dataset.path)"))
    assert wanted <= shown, wanted - shown
    assert all("offload" in key or "offload" in page.locator(f'.field[data-path="{key}"] .help').text_content().lower()
               for key in shown)  # the rest say it in their help (CPU_OFFLOADED checkpointing)
    assert page.locator("#key-search-count").text_content().startswith(f"{len(shown)} key(s) found, and ")
    page.check("#show-inapplicable")  # every offloading key, those of the model's absent second expert too
    expect(page.locator("#key-search-count")).not_to_contain_text("do not apply")
    shown = set(page.evaluate("() => [...document.querySelectorAll('#config-form .field')].filter(f => f.offsetParent !== null).map(f => f.dataset.path)"))
    assert offloading <= shown, offloading - shown
    assert page.locator("#key-search-count").text_content() == f"{len(shown)} key(s) found"
    page.uncheck("#show-inapplicable")
    print(f"'offload' finds {len(shown)} keys: {sorted(shown)}")
    page.fill("#key-search", "")
    expect(page.locator('#config-form .group[data-group="training"]')).to_be_visible()
    expect(page.locator('#config-form .group[data-group="model"]')).to_be_hidden()
    page.close()


def test_keys_the_model_and_method_never_read_are_hidden_until_asked_for(ui):
    """WAN 2.1 LoRA: the sound keys, LoKr's, the second expert's, guidance and the first/last-frame keys are hidden
    (a note says how many and why); LTX-2 brings the sound keys back, FINE_TUNE hides the LoRA keys; "show them"
    shows each with the reason; a key set in the file stays shown whatever it is."""
    import re

    from playwright.sync_api import expect

    page = ui.page()
    ui.load(page, ui.config(), "applies.json")
    field = lambda key: page.locator(f'#config-form .field[data-path="{key}"]')
    unused = re.compile(r"\binapplicable\b")
    for key in ("train_audio", "audio_loss_weight", "lokr_dim", "boundary_ratio", "guidance_scale",
                "last_frame_conditioning_probability", "transformer_2.offload_fraction", "samples.0.last_image"):
        expect(field(key)).to_have_class(unused)
    for key in ("lora_rank", "learning_rate", "transformer.offload_fraction", "samples.0.prompt", "video_config.max_frames"):
        expect(field(key)).not_to_have_class(unused)
    expect(page.locator('#config-form details[data-path="transformer_2"]')).to_have_class(unused)
    expect(page.locator("#inapplicable-note")).to_contain_text("do not apply to WAN_2_1_T2V with LORA")
    hidden_for_wan = int(page.locator("#inapplicable-note span").text_content().split()[0])
    group_of = lambda key: page.click("#group-" + field(key).evaluate("f => f.closest('.group').dataset.group"))
    group_of("model_type")
    page.select_option("#field-model_type", "LTX_2")
    expect(field("train_audio")).not_to_have_class(unused)  # LTX-2 makes sound
    expect(field("lokr_dim")).to_have_class(unused)
    group_of("training_method")
    page.select_option("#field-training_method", "FINE_TUNE")
    expect(field("lora_rank")).to_have_class(unused)
    expect(field("lora_rank")).to_be_hidden()
    page.check("#show-inapplicable")
    group_of("lora_rank")
    expect(field("lora_rank")).to_be_visible()
    assert field("lora_rank").get_attribute("title") == "does not apply: LoRA settings: training_method is FINE_TUNE"
    ui.shot(page, "3-keys-that-do-not-apply-shown")
    page.uncheck("#show-inapplicable")
    expect(field("lora_rank")).to_be_hidden()

    # a value in the file is shown even where it cannot apply (the user sees what the file says)
    ui.load(page, ui.config(train_audio=False), "applies-set.json")
    expect(field("train_audio")).not_to_have_class(unused)
    expect(field("audio_loss_weight")).to_have_class(unused)
    print(f"WAN 2.1 LoRA: {hidden_for_wan} keys hidden")
    page.close()


def test_path_pickers_browse_the_allowed_folders_and_fill_the_field(ui):
    """The … beside a path field lists the folders the UI may browse (here the test's root), folders first; a folder
    opens, "Choose this folder" takes it, a file is taken with one click; the field is then as if typed."""
    from playwright.sync_api import expect

    page = ui.page()
    ui.load(page, ui.config(concepts=[{"name": "clips", "path": "not/a/folder"}]), "picker.json")
    page.click("#group-concepts")
    page.locator('.field[data-path="concepts.0.path"] button.pick').click()
    picker = page.locator("#picker")
    expect(picker).to_be_visible()
    expect(page.locator("#picker-where")).to_have_text("the folders this UI may browse")  # a relative path: from the top
    expect(page.locator("#picker-list button")).to_have_text([f"📁 {ui.root}/"])
    page.locator("#picker-list button").first.click()
    expect(page.locator("#picker-where")).to_have_text(str(ui.root))
    names = page.locator("#picker-list button").all_text_contents()
    folders = [n for n in names if n.startswith("📁")]
    assert names[:len(folders)] == folders and "📁 dataset/" in folders and "picker.json" in names, names
    page.locator("#picker-list button", has_text="📁 dataset/").click()
    expect(page.locator("#picker-list button")).to_contain_text(["big_buck_bunny_432_433.webm"])
    page.click("#picker-choose")
    expect(picker).to_be_hidden()
    expect(page.locator("#field-concepts-0-path")).to_have_value(str(ui.dataset))
    ui.kept(lambda kept: kept["concepts"][0]["path"] == str(ui.dataset), "the chosen folder is the config's")

    # a file: one click; the picker opens where the field points
    page.click("#tab-config")
    page.fill("#load-path", str(ui.dataset / "shapes_200px_30fps.txt"))
    page.locator("#load-path + button.pick").click()
    expect(page.locator("#picker-where")).to_have_text(str(ui.dataset))
    page.locator("#picker-up").click()
    expect(page.locator("#picker-where")).to_have_text(str(ui.root))
    page.locator("#picker-list button", has_text="picker.json").click()
    expect(page.locator("#load-path")).to_have_value(str(ui.root / "picker.json"))
    ui.shot(page, "3-path-picked")
    page.close()


def test_dataset_page_edits_captions_in_place(ui):
    from playwright.sync_api import expect

    page = ui.page(PHONE)
    ui.load(page, ui.config())
    page.click("#tab-dataset")
    expect(page.locator("#inspect-empty")).to_be_visible()
    page.click("#tab-config")
    page.click("#group-concepts")  # the concept editor: a card per concept, its folder inspected from there
    card = page.locator('.array-item[data-path="concepts.0"]')
    expect(card.locator(".item-head")).to_contain_text("1. clips")
    expect(card.locator("#field-concepts-0-path")).to_have_value(str(ui.dataset))
    card.locator("button.inspect-concept").click()
    expect(page.locator("#page-dataset")).to_be_visible()
    expect(page.locator("#dataset-folder")).to_have_value(str(ui.dataset))
    expect(page.locator("#inspect-status")).to_have_text("2 of 3 files usable", timeout=60_000)
    expect(page.locator("#inspect-problems")).to_contain_text("broken.mp4")
    expect(page.locator("#inspect-problems")).to_contain_text("no caption file (big_buck_bunny_432_433.txt)")
    assert page.locator("#inspect-table img").count() == 6  # two usable files, one clip each, first/middle/last frame
    page.locator("#inspect-problems button", has_text="write one").click()
    row = page.locator('#inspect-table tr[data-name="big_buck_bunny_432_433.webm"]')
    row.locator("textarea").fill("a rabbit in a meadow")
    row.locator("button.save-caption").click()
    expect(row.locator("button.save-caption")).to_have_text("saved")
    assert (ui.dataset / "big_buck_bunny_432_433.txt").read_text() == "a rabbit in a meadow\n"
    expect(page.locator('#inspect-table tr[data-name="shapes_200px_30fps.mp4"] textarea')).to_have_value("moving shapes")
    assert sideways_scroll(page) == 0
    ui.shot(page, "5-dataset-390")
    # an edit not saved is not lost without a word: Inspect asks first (dismissed: the edit stays)
    shapes = page.locator('#inspect-table tr[data-name="shapes_200px_30fps.mp4"] textarea')
    shapes.fill("moving shapes, edited")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("#inspect")
    assert asked and "1 caption edit(s) not saved" in asked[0], asked
    expect(shapes).to_have_value("moving shapes, edited")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#inspect")  # inspected again: the caption is the file's now
    expect(page.locator("#inspect-problems")).not_to_contain_text("big_buck_bunny_432_433.txt", timeout=60_000)
    expect(shapes).to_have_value("moving shapes")
    page.close()


def _wait_steps(page, at_least: int, timeout: float = 120_000) -> None:
    page.wait_for_function(f"() => JSON.parse(document.querySelector('#loss-chart').dataset.steps || '[]').length >= {at_least}",
                           timeout=timeout)


def _chart_steps(page) -> list[int]:
    return json.loads(page.locator("#loss-chart").get_attribute("data-steps"))


def test_the_validation_loss_is_drawn_beside_the_training_loss(ui):
    """A run with a VALIDATION concept (run from the command line, watched): its held-out loss is a second line on
    the loss chart."""
    from playwright.sync_api import expect

    from motiontune.cli import main

    held_out = ui.root / "held-out"
    held_out.mkdir()
    shutil.copy(DATA / "big_buck_bunny_432_433.webm", held_out / "rabbit.webm")
    config = tiny_training_config(ui.root / "validated", ui.model)
    config.update(concepts=[{"path": str(ui.dataset)}, {"name": "held out", "path": str(held_out), "type": "VALIDATION"}],
                  epochs=2, sample_after_unit="NEVER", validation=True, validate_after=1, validate_after_unit="STEP")
    (ui.root / "validated.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(ui.root / "validated.json")]) == 0
    page = ui.page()
    page.click("#tab-training")
    page.fill("#watch-path", config["workspace_dir"])
    page.click("#watch")
    expect(page.locator("#chart-legend span")).to_have_count(2, timeout=60_000)
    expect(page.locator("#chart-legend span").nth(1)).to_contain_text("validation")


def test_runs_reload_sample_now_stop_resume_and_a_second_run(ui):
    """A run in its own folder; a reload mid-run keeps the form; Sample now writes a sample at the step then;
    Backup now and Save now; Stop; Resume continues the same run (step count and chart unbroken); a second run
    has its own folder and chart, and both overlay for comparison. Start/Stop/Resume enabled as the state allows."""
    from playwright.sync_api import expect

    page = ui.page()
    ui.load(page, ui.config(lora_rank=8))
    page.click("#tab-training")
    expect(page.locator("#runs-empty")).to_be_visible()
    expect(page.locator("#stop-training")).to_be_disabled()
    expect(page.locator("#resume-run")).to_be_disabled()
    expect(page.locator("#start-training")).to_be_enabled()
    page.click("#start-training")
    expect(page.locator("#train-message")).to_contain_text("started", timeout=60_000)
    expect(page.locator("#start-training")).to_be_disabled()
    expect(page.locator("#runs-table tbody tr")).to_have_count(1)
    first = Path(page.locator("#runs-table tbody tr").first.get_attribute("data-path"))
    assert first.parent == ui.root / "workspace" / "runs"
    _wait_steps(page, 2)

    # a reload mid-run: the same page, the same form, the run still shown
    ui.reload(page)
    expect(page.locator("#page-training")).to_be_visible()
    expect(page.locator("#run-state")).to_have_text("training")
    page.click("#tab-config")
    expect(page.locator("#config-status")).to_have_text("config valid")
    page.click("#group-training")
    expect(page.locator("#field-lora_rank")).to_have_value("8")
    page.click("#tab-training")

    expect(page.locator("#run-step")).to_contain_text("%")
    expect(page.locator("#run-epoch")).to_contain_text("/ 300")
    expect(page.locator("#run-speed")).to_contain_text("s/step", timeout=60_000)
    expect(page.locator("#run-memory")).to_contain_text("RAM")
    expect(page.locator("#stop-training")).to_be_enabled()
    expect(page.locator("#resume-run")).to_be_disabled()

    # Sample now: a sample of the step the run was at, labelled with the step and its prompt
    asked_at = int(json.loads((first / "progress.json").read_text())["step"])
    page.click("#sample-now")
    expect(page.locator("#train-message")).to_contain_text("sample asked for")
    figure = page.locator("#samples figure").first
    expect(figure).to_contain_text("(asked for)", timeout=60_000)
    step = int(figure.get_attribute("data-step"))
    now = int(json.loads((first / "progress.json").read_text())["step"])
    assert asked_at <= step <= now, (asked_at, step, now)  # the step the run was at when it took the request
    taken = [json.loads(line) for line in (first / "requests" / "taken.jsonl").read_text().splitlines()]
    assert [(a["action"], a["step"], a["result"]) for a in taken] == [("sample", step, "done")]
    assert (first / "samples" / f"step{step}-now-0.mp4").is_file()
    expect(figure).to_contain_text(f"step {step}")
    expect(figure).to_contain_text(ui.config()["samples"][0]["prompt"])
    page.wait_for_function("() => { const v = document.querySelector('#samples video'); return v && v.readyState >= 2 && v.videoWidth === 64; }",
                           timeout=30_000)
    page.click("#backup-now")
    expect(page.locator("#backups li[data-name^='step-']")).to_have_count(1, timeout=60_000)
    page.click("#save-now")
    expect(page.locator("#outputs li.save")).to_have_count(1, timeout=60_000)
    with page.expect_download() as saved:  # the LoRA is saved under its own name (it was "file")
        page.locator("#outputs li.save a").click()
    assert saved.value.suggested_filename.endswith(".safetensors"), saved.value.suggested_filename
    ui.shot(page, "6-run-training")

    # Stop, then Resume: the same run goes on from its backup
    page.click("#stop-training")
    expect(page.locator("#run-state")).to_have_text("stopped", timeout=60_000)
    # as the stopped state shows, Start says nothing of a run training (it did, until the list was polled again)
    assert page.locator("#start-hint").text_content() == "" and page.locator("#start-training").is_enabled()
    stopped_at = json.loads((first / "result.json").read_text())["steps"]
    total = json.loads((first / "progress.json").read_text())["total_steps"]
    elapsed_when_stopped = json.loads((first / "progress.json").read_text())["elapsed_seconds"]
    expect(page.locator("#resume-run")).to_be_enabled()
    expect(page.locator("#stop-training")).to_be_disabled()
    expect(page.locator("#run-result")).to_contain_text("Stopped early")
    page.click("#resume-run")
    expect(page.locator("#train-message")).to_contain_text("resumed")
    page.wait_for_function(f"() => JSON.parse(document.querySelector('#loss-chart').dataset.steps || '[]').length >= {stopped_at + 2}",
                           timeout=120_000)
    steps = _chart_steps(page)
    assert steps == list(range(1, len(steps) + 1)), steps  # no gap, no step twice, no jump back
    progress = json.loads((first / "progress.json").read_text())
    assert progress["step"] > stopped_at and progress["total_steps"] == total
    assert progress["elapsed_seconds"] > elapsed_when_stopped  # goes on from the first session's (it restarted at 0)
    assert "continuing from" in (first / "train.log").read_text()
    page.click("#stop-training")
    expect(page.locator("#run-state")).to_have_text("stopped", timeout=60_000)
    first_steps = _chart_steps(page)

    # a second run: its own folder and chart, the first one kept and overlaid for comparison
    page.click("#start-training")
    expect(page.locator("#runs-table tbody tr")).to_have_count(2, timeout=60_000)
    second = Path(page.locator("#runs-table tbody tr.selected").get_attribute("data-path"))
    assert second != first and second.parent == first.parent
    expect(page.locator("#run-id")).to_have_text(second.name)
    expect(page.locator("#run-state")).to_have_text("training", timeout=60_000)
    _wait_steps(page, 2)
    steps = _chart_steps(page)
    assert steps == list(range(1, len(steps) + 1)), steps  # from step 1: nothing of the first run's
    page.locator(f'#runs-table tr[data-path="{first}"] input.compare').check()
    page.wait_for_function("() => +document.querySelector('#loss-chart').dataset.compared > 0", timeout=60_000)
    assert int(page.locator("#loss-chart").get_attribute("data-compared")) == len(first_steps)
    expect(page.locator("#chart-legend span")).to_have_count(2)
    assert (first / "samples").is_dir() and not (second / "samples").exists()  # the first run's samples stay its own
    ui.shot(page, "7-second-run-compared")
    page.set_viewport_size({"width": PHONE, "height": 900})
    # the charts are redrawn at the new width on the resize: wait for that state, not for a fixed time
    page.wait_for_function(f"() => {{ const w = document.querySelector('#loss-chart').getBoundingClientRect().width; "
                           f"return w >= 300 && w <= {PHONE}; }}")
    assert sideways_scroll(page) == 0
    canvas_width = page.evaluate("() => document.querySelector('#loss-chart').getBoundingClientRect().width")
    assert canvas_width >= 300, canvas_width  # the charts use the phone's width
    ui.shot(page, "7-second-run-390")
    page.click("#stop-training")
    expect(page.locator("#run-state")).to_have_text("stopped", timeout=60_000)
    expect(page.locator("#start-training")).to_be_enabled()
    for folder in (first, second):
        assert (folder / "run-config.json").is_file() and (folder / "train.log").is_file()
        assert (folder / "output" / "tiny-lora.safetensors").is_file()
        assert list((folder / "backup").glob("step-*"))
    page.close()


def _gallery(root: Path) -> dict[str, Path]:
    """A workspace of two finished runs with samples of two prompts at several steps; each video has its own width,
    so the page can be asked which file it plays. Run b samples at other steps than run a, and only one prompt."""
    import numpy as np

    from motiontune.data.video import write_video

    widths = iter(range(64, 64 + 16 * 10, 16))
    runs = {}
    for name, prompts, names in (("a", ["a red ball", "a blue cube"], ["step2-0", "step4-0", "step6-0", "step2-1", "step6-1"]),
                                 ("b", ["a red ball"], ["step3-0", "step5-0"])):
        folder = root / "gallery" / "runs" / name
        (folder / "samples").mkdir(parents=True)
        (folder / "run-config.json").write_text(json.dumps({"model_type": "WAN_2_1", "samples": [{"prompt": p} for p in prompts]}))
        for stem in names:
            width = next(widths)
            frames = np.full((3, 48, width, 3), (width * 3) % 255, dtype=np.uint8)
            write_video(folder / "samples" / f"{stem}.mp4", frames, fps=8)
            (folder / "samples" / f"{stem}.width").write_text(str(width))
        runs[name] = folder
    os.utime(runs["a"] / "run-config.json", (1, 1))  # a is the older run: b is listed first
    return runs


def _playing_width(figure) -> int:
    """The width of the video a figure plays, once the browser has decoded its first frame."""
    figure.locator("video").evaluate("v => new Promise(done => v.readyState >= 2 ? done() : v.addEventListener('loadeddata', done, { once: true }))")
    return figure.locator("video").evaluate("v => v.videoWidth")


def test_samples_over_time_slide_across_steps_and_sit_beside_the_compared_run(ui):
    """Per prompt, a slider walks the run's samples in step order (the newest shown until it is moved), and the
    run compared on the chart shows its sample of the same prompt at the nearest step beside it."""
    from playwright.sync_api import expect

    runs = _gallery(ui.root)
    width = lambda run, stem: int((runs[run] / "samples" / f"{stem}.width").read_text())
    page = ui.page()
    page.click("#tab-training")
    page.fill("#watch-path", str(ui.root / "gallery"))
    page.click("#watch")
    expect(page.locator("#runs-table tbody tr")).to_have_count(2)
    page.locator(f'#runs-table tr[data-path="{runs["a"]}"] td').first.click()
    expect(page.locator("#run-id")).to_have_text("a")
    rows = page.locator("#samples .prompt-samples")
    expect(rows).to_have_count(2)
    ball, cube = rows.nth(0), rows.nth(1)
    expect(ball).to_have_attribute("data-prompt", "a red ball")
    expect(cube).to_have_attribute("data-prompt", "a blue cube")
    expect(ball.locator("output")).to_have_text("step 6 · 3 of 3")  # the newest first
    assert _playing_width(ball.locator("figure.this-run")) == width("a", "step6-0")
    slider = ball.locator("input.sample-step")
    for value, stem in ((0, "step2-0"), (1, "step4-0")):
        slider.fill(str(value))
        expect(ball.locator("output")).to_have_text(f"step {stem[4]} · {value + 1} of 3")
        assert _playing_width(ball.locator("figure.this-run")) == width("a", stem)
    expect(ball.locator("figure.compared-run")).to_have_count(0)  # nothing compared yet
    ui.shot(page, "8-samples-over-time")

    # compared with run b: its sample of the same prompt nearest step 4 (3 and 5 are as near: the earlier), none for
    # the prompt b never sampled; the slider stays where it was put across polls
    page.locator(f'#runs-table tr[data-path="{runs["b"]}"] input.compare').check()
    compared = ball.locator("figure.compared-run")
    expect(compared).to_contain_text("b · step 3")
    expect(ball.locator("figure.this-run")).to_contain_text("a · step 4")
    assert _playing_width(compared) == width("b", "step3-0")
    expect(cube.locator("figure.compared-run")).to_have_count(0)
    slider.fill("2")
    expect(compared).to_contain_text("b · step 5")
    assert _playing_width(compared) == width("b", "step5-0")
    page.keyboard.press("Home")  # the slider is a keyboard control too
    expect(ball.locator("output")).to_have_text("step 2 · 1 of 3")
    expect(compared).to_contain_text("b · step 3")
    ui.shot(page, "8-samples-side-by-side")
    page.locator(f'#runs-table tr[data-path="{runs["b"]}"] input.compare').uncheck()
    expect(compared).to_have_count(0)
    page.close()


def test_no_page_scrolls_sideways_at_390_px(ui):
    from playwright.sync_api import expect

    page = ui.page(PHONE)
    for group in ("general", "model", "data", "concepts", "training", "sampling", "backup", "tools"):
        page.click(f"#group-{group}")
        for details in page.locator("#config-form details").all():
            if details.is_visible():
                details.evaluate("d => d.open = true")
        assert sideways_scroll(page) == 0, group
    page.click("#tab-dataset")
    page.fill("#dataset-folder", str(ui.dataset))
    page.click("#inspect")
    expect(page.locator("#inspect-table tbody tr")).to_have_count(3, timeout=60_000)
    assert sideways_scroll(page) == 0
    page.click("#tab-training")
    expect(page.locator("#runs-table tbody tr")).to_have_count(2, timeout=30_000)  # a loaded machine lists runs slowly
    assert sideways_scroll(page) == 0
    # compare is on screen, not scrolled away inside the table (measured in one go: the rows are redrawn each poll)
    rights = page.evaluate("() => [...document.querySelectorAll('#runs-table input.compare')].map(c => c.getBoundingClientRect().right)")
    assert len(rights) == 2 and max(rights) <= PHONE, rights
    ui.shot(page, "8-runs-390")
    page.close()

    # at 1280 px the dataset's problems column is whole on screen, and "none" is not painted as a problem
    page = ui.page(DESKTOP)
    page.click("#tab-dataset")
    page.fill("#dataset-folder", str(ui.dataset))
    page.click("#inspect")
    expect(page.locator("#inspect-table tbody tr")).to_have_count(3, timeout=60_000)
    cells = page.evaluate("() => [...document.querySelectorAll('#inspect-table td.problems')].map(c => [c.getBoundingClientRect().right, c.scrollWidth <= c.clientWidth])")
    assert len(cells) == 3 and all(right <= DESKTOP and whole for right, whole in cells), cells
    ui.shot(page, "8-dataset-1280")
    page.close()


def test_every_page_passes_an_accessibility_check_light_and_dark(ui):
    """axe-core (the copy axe-playwright-python carries) on each page, at both widths, in the light and the dark
    scheme: no serious or critical violation. Tabs carry ARIA roles, a field's input is described by its help and
    error, dark mode follows the system, and the whole log and TensorBoard are a click away from a run."""
    from axe_playwright_python.sync_playwright import Axe
    from playwright.sync_api import expect

    axe = Axe()
    for scheme in ("light", "dark"):
        for width in (DESKTOP, PHONE):
            page = ui.browser.new_page(viewport={"width": width, "height": 900}, color_scheme=scheme)
            page.set_default_timeout(60_000)
            page.goto(ui.server.url)
            page.wait_for_selector("body[data-ready='1']")
            background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
            assert (background == "rgb(18, 21, 27)") == (scheme == "dark"), (scheme, background)
            for tab in ("config", "dataset", "training"):
                page.click(f"#tab-{tab}")
                expect(page.locator(f"#tab-{tab}")).to_have_attribute("aria-selected", "true")
                if tab == "training":
                    expect(page.locator("#runs-table tbody tr")).to_have_count(2)
                    expect(page.locator("#whole-log")).to_be_visible()
                    expect(page.locator("#tensorboard-command")).to_contain_text("tensorboard --logdir")
                found = axe.run(page).response["violations"]
                serious = [(v["id"], [n["target"] for n in v["nodes"][:3]]) for v in found if v["impact"] in ("serious", "critical")]
                assert not serious, (scheme, width, tab, serious)
            page.close()

    page = ui.page()
    described = page.locator("#field-epochs").get_attribute("aria-describedby").split()
    assert described == ["field-epochs-help", "field-epochs-error", "field-epochs-warning"]
    assert page.locator("#field-epochs-help").text_content().strip()  # the id names the field's own help
    page.click("#tab-training")
    expect(page.locator("#whole-log")).to_have_attribute("href", re.compile("train.log"))
    whole = page.request.get(ui.server.url + page.locator("#whole-log").get_attribute("href"))
    shown = page.locator("#run-log").text_content()
    assert whole.ok and len(whole.text()) > len(shown)  # the page shows the end (4,000 characters), the link all of it
    page.close()


def test_the_basic_view_fits_one_screen_keeps_every_key_and_starts_a_run(ui, tmp_path):
    """`#wan 2.1 LoRA` in the basic view: its few keys and the memory estimate on one 1280x800 screen; a first run
    set up there (model, a folder of clips, the size, where to write) starts; Advanced shows every key the preset
    had, nothing lost."""
    from playwright.sync_api import expect

    page = ui.browser.new_page(viewport={"width": DESKTOP, "height": 800})
    page.set_default_timeout(60_000)
    page.goto(ui.server.url)
    page.wait_for_selector("body[data-ready='1']")
    page.select_option("#preset-select", "#wan 2.1 LoRA")
    page.click("#load-preset")
    expect(page.locator("#field-resolution")).to_have_value("832x480")
    page.check("#view-basic")
    expect(page.locator("#groups")).to_be_hidden()
    shown = page.evaluate("() => [...document.querySelectorAll('#config-form .field')].filter(f => f.offsetParent !== null).map(f => f.dataset.path)")
    assert set(shown) == {"model_type", "training_method", "base_model_name", "resolution", "epochs", "learning_rate",
                          "lora_rank", "workspace_dir", "output_model_destination"}, shown
    expect(page.locator("#estimate-panel")).to_be_visible()
    ui.shot(page, "9-basic-view")
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height <= 800, f"the basic view is {height} px high"

    page.locator('details[data-path="concepts"] button.add').click()
    page.fill("#field-concepts-0-path", str(ui.dataset))
    page.fill("#field-base_model_name", str(ui.model))
    page.fill("#field-resolution", "64x48")
    page.fill("#field-epochs", "50")
    page.fill("#field-workspace_dir", str(tmp_path / "basic-workspace"))
    page.fill("#field-output_model_destination", str(tmp_path / "basic-lora.safetensors"))
    page.check("#view-advanced")  # nothing the preset set is lost by the basic view
    expect(page.locator("#groups")).to_be_visible()
    ui.kept(lambda kept: kept["resolution"] == "64x48" and kept["lora_rank"] == 32 and kept["timestep_shift"] == 3.0
            and kept["samples"][0]["frames"] == 33 and kept["concepts"][0]["path"] == str(ui.dataset))
    page.click("#group-data")
    page.locator('details[data-path="video_config"]').evaluate("d => d.open = true")
    expect(page.locator("#field-video_config-max_frames")).to_have_value("33")
    page.fill("#field-video_config-max_frames", "9")
    page.click("#group-sampling")
    page.locator('details[data-path="samples"]').evaluate("d => d.open = true")
    page.fill("#field-samples-0-frames", "5")
    page.fill("#field-samples-0-height", "48")
    page.fill("#field-samples-0-width", "64")
    page.check("#view-basic")
    expect(page.locator("#config-status")).to_have_text("config valid")
    page.click("#tab-training")
    page.click("#start-training")
    expect(page.locator("#run-state")).to_have_text("training", timeout=120_000)
    page.click("#stop-training")
    expect(page.locator("#run-state")).to_have_text("stopped", timeout=120_000)
    page.close()


def test_queued_jobs_run_in_order_with_the_page_closed(ui):
    """Four jobs in the queue: a long one (stopped from the page), one that fails when its model loads, one
    cancelled before its turn, and a short one. With the page closed, each starts when the one before ends, the
    failed one does not stop the next, the cancelled one never starts; reopened, the page lists what ran when."""
    import httpx
    from playwright.sync_api import expect

    page = ui.page()
    jobs = {"long": ui.config(), "failing": ui.config(base_model_name=str(ui.dataset)),  # a folder, but no model
            "cancelled": ui.config(epochs=1), "short": ui.config(epochs=1)}
    for name, config in jobs.items():
        ui.load(page, config, f"{name}.json")
        page.click("#tab-training")
        page.click("#queue-add")
        expect(page.locator("#train-message")).to_contain_text(f"queued {ui.root / (name + '.json')}")
    rows = page.locator("#queue-table tbody tr")
    expect(rows).to_have_count(4)
    cancelled = rows.nth(2)
    cancelled.locator("button.job-cancel").click()
    expect(cancelled.locator(".job-state")).to_have_text("cancelled")
    expect(rows.nth(0).locator(".job-state")).to_have_text("training", timeout=120_000)
    rows.nth(0).locator("a.job-run").click()  # the first job's run, shown below
    expect(page.locator("#run-id")).to_have_text(rows.nth(0).locator("a.job-run").text_content())
    page.click("#stop-training")
    page.close()  # the rest happens with no page open

    def listing():
        return httpx.get(f"{ui.server.url}/api/queue").json()["jobs"]

    deadline = time.time() + 600  # a state, not a delay: the short job's run is done
    while not (listing()[3].get("run_state") == "done"):
        assert time.time() < deadline, listing()
        time.sleep(1)
    done = listing()
    assert [j.get("run_state") or j["state"] for j in done] == ["stopped", "failed", "cancelled", "done"], done
    assert done[2]["run"] is None and done[2]["started"] is None  # never started
    assert done[0]["started"] < done[1]["started"] < done[3]["started"]  # in order, one after another

    page = ui.page()
    page.click("#tab-training")
    expect(page.locator("#queue-table tbody tr .job-state")).to_have_text(["stopped", "failed", "cancelled", "done"])
    ui.shot(page, "10-queue")
    page.close()


def test_every_key_has_help_from_docs_config_md():
    """Every key at every depth has its row in docs/config.md, the one text the form's help and the docs share;
    every top-level key belongs to one of the form's groups."""
    from motiontune.ui.schema_help import GROUP_OF, doc_key, schema_keys, ui_schema

    schema = ui_schema()
    keys = schema_keys(schema)
    assert len(keys) > 150  # nested sections and list items included
    missing = sorted({doc_key(path) for path, prop in keys if not prop.get("x-help")})
    assert not missing, f"keys without a row in docs/config.md: {missing}"
    assert not [key for key in schema["properties"] if key not in GROUP_OF]
    assert "4n+1" in schema["$defs"]["VideoConfig"]["properties"]["max_frames"]["x-help"]


# ---------------------------------------------------------------------------------------------- files

@pytest.fixture
def served_workspace(tmp_path):
    """A workspace with a sample, an output folder elsewhere, and secrets beside and outside both."""
    workspace = tmp_path / "run" / "workspace"
    (workspace / "samples").mkdir(parents=True)
    (workspace / "samples" / "step2-0.mp4").write_bytes(b"sample bytes")
    out = tmp_path / "models"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"lora bytes")
    (workspace / "config.json").write_text(json.dumps({"output_model_destination": str(out / "lora.safetensors")}))
    (tmp_path / "run" / "secret.txt").write_text("SECRET beside the workspace")
    (tmp_path / "secret.txt").write_text("SECRET outside")
    (workspace / "samples" / "escape.mp4").symlink_to(tmp_path / "secret.txt")
    return tmp_path, workspace, out


def test_files_are_served_only_inside_the_workspace_and_output_folders(served_workspace):
    import httpx

    tmp_path, workspace, out = served_workspace
    with LiveServer(workspace) as server:
        allowed = {
            "/files/samples/step2-0.mp4": b"sample bytes",
            f"/api/file?path={out / 'lora.safetensors'}": b"lora bytes",
            "/api/file?path=samples/step2-0.mp4": b"sample bytes",
        }
        for target, body in allowed.items():
            assert server.raw_get(target) == (200, body), target
        named = httpx.get(f"{server.url}/api/file?path={out / 'lora.safetensors'}")
        assert named.headers["content-disposition"] == 'inline; filename="lora.safetensors"'  # not saved as "file"
        refused = [
            "/files/../secret.txt",
            "/files/../../secret.txt",
            "/files/samples/../../secret.txt",
            "/files/%2e%2e/secret.txt",
            "/files/..%2fsecret.txt",
            "/files/%2e%2e%2f%2e%2e%2fsecret.txt",
            "/files/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",
            f"/files/{tmp_path / 'secret.txt'}",  # an absolute path joined to the workspace replaces it
            f"/files/%2f{str(tmp_path / 'secret.txt').lstrip('/')}",
            "/files/samples/escape.mp4",  # a symlink out of the workspace
            "/api/file?path=/etc/passwd",
            f"/api/file?path={tmp_path / 'secret.txt'}",
            "/api/file?path=../secret.txt",
            "/api/file?path=..%2f..%2fsecret.txt",
            f"/api/file?path={out}/../secret.txt",
            "/static/../server.py",
            "/static/%2e%2e/server.py",
            "/static/..%2fserver.py",
            "/../../etc/passwd",
        ]
        for target in refused:
            status, body = server.raw_get(target)
            assert status in (403, 404), (target, status)
            assert b"SECRET" not in body and b"root:" not in body and b"import" not in body, target
        # the page's own assets are served
        assert server.raw_get("/static/app.js")[0] == 200 and server.raw_get("/")[0] == 200


def test_the_pickers_list_only_inside_the_folders_they_may_browse(tmp_path):
    """Names only, inside the --browse folders: `..` and absolute paths out are refused with what to do, a symlink
    leading out is not listed, hidden files are not listed, folders come first."""
    from fastapi.testclient import TestClient

    from motiontune.ui import create_app

    root, outside = tmp_path / "allowed", tmp_path / "outside"
    (root / "clips" / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("no")
    (root / "clips" / "b.mp4").write_bytes(b"")
    (root / "clips" / ".hidden").write_text("")
    (root / "clips" / "out").symlink_to(outside)
    (root / "clips" / "inside").symlink_to(root / "clips" / "a")
    client = TestClient(create_app(tmp_path / "home", browse=[root]), base_url="http://127.0.0.1:8765")
    assert client.get("/api/browse").json()["entries"] == [{"name": str(root), "path": str(root), "folder": True}]
    listed = client.get("/api/browse", params={"path": str(root / "clips")}).json()
    assert [(e["name"], e["folder"]) for e in listed["entries"]] == [("a", True), ("inside", True), ("b.mp4", False)]
    assert listed["parent"] == str(root)
    assert client.get("/api/browse", params={"path": str(root)}).json()["parent"] is None  # the top: back to the roots
    for path in (str(root / ".." / "outside"), str(outside), str(root / "clips" / "out"), "/"):
        answer = client.get("/api/browse", params={"path": path})
        assert answer.status_code == 403 and "--browse DIR" in answer.json()["detail"], (path, answer.text)
    assert client.get("/api/browse", params={"path": str(root / "clips" / "b.mp4")}).status_code == 404
    # by default: the folder the UI was started in and its workspace (one inside the other: listed once)
    default = TestClient(create_app(Path.cwd() / "workspace"), base_url="http://127.0.0.1:8765")
    assert [e["path"] for e in default.get("/api/browse").json()["entries"]] == [str(Path.cwd().resolve())]


def test_requests_from_other_sites_or_hosts_are_refused(served_workspace):
    from fastapi.testclient import TestClient

    from motiontune.ui import create_app

    _, workspace, _ = served_workspace
    client = TestClient(create_app(workspace), base_url="http://127.0.0.1:8765")
    assert client.get("/api/run").status_code == 200
    assert client.get("/api/run", headers={"host": "attacker.example:8765"}).status_code == 403  # DNS rebinding
    # a GET (which another site's <img> can send) never adds a folder to those served
    assert client.get("/api/run?path=/etc").status_code == 403
    assert client.get("/api/file?path=/etc/passwd").status_code == 403
    refused = client.post("/api/train/stop", json={}, headers={"origin": "http://attacker.example"})
    assert refused.status_code == 403
    # a plain HTML form can post text/plain cross-site without a preflight: only JSON is taken
    assert client.post("/api/train/start", content=b'{"config": {}}', headers={"content-type": "text/plain"}).status_code == 415


# ---------------------------------------------------------------------------------------------- watching a CLI run

def test_a_run_started_elsewhere_is_watched_from_its_workspace(tmp_path):
    from fastapi.testclient import TestClient
    from torch.utils.tensorboard import SummaryWriter

    from motiontune.train.progress import ProgressFile
    from motiontune.ui import create_app

    workspace = tmp_path / "cli-run"
    writer = SummaryWriter(str(workspace / "tensorboard"))
    for step in range(1, 6):
        writer.add_scalar("loss", 1.0 / step, step)
        writer.add_scalar("lr/high_noise", 1e-4, step)
    writer.close()
    progress = ProgressFile(workspace, total_steps=10, start_step=0)  # written as loop.py writes it, by this live process
    progress.update(1, 1, 1.0)
    time.sleep(0.05)
    progress.update(5, 1, 0.2)
    (workspace / "samples").mkdir()
    (workspace / "samples" / "step4-0.mp4").write_bytes(b"video")
    backup = workspace / "backup" / "step-0000004-epoch-0000-batch-00004"
    backup.mkdir(parents=True)
    (backup / "state.pt").write_bytes(b"")
    (backup / "backup.json").write_text(json.dumps({"step": 4, "written": "2026-01-01 00:00:00"}))
    (workspace / "backup" / ".partial-step-0000005").mkdir()  # an unfinished backup is not listed

    client = TestClient(create_app(), base_url="http://127.0.0.1:8765")
    assert client.get("/api/run").json() == {"workspace": None}
    assert client.get("/files/samples/step4-0.mp4").status_code == 404  # nothing watched, nothing served
    assert client.post("/api/watch", json={"workspace": str(workspace)}).status_code == 200
    run = client.get("/api/run").json()
    assert run["running"] is True and run["owned"] is False
    assert run["progress"]["step"] == 5 and run["progress"]["total_steps"] == 10
    assert run["progress"]["eta_seconds"] is not None and run["progress"]["eta_seconds"] >= 0
    assert run["progress"]["memory"]["rss_mb"] > 0
    assert [p[0] for p in run["scalars"]["loss"]] == [1, 2, 3, 4, 5]
    assert run["scalars"]["loss"][-1][1] == pytest.approx(0.2)
    assert run["scalars"]["lr/high_noise"][0][1] == pytest.approx(1e-4)
    assert [s["name"] for s in run["samples"]] == ["step4-0.mp4"]
    assert client.get(run["samples"][0]["url"]).content == b"video"
    assert [b["name"] for b in run["backups"]] == [backup.name]
    progress.finish("done")
    assert client.get("/api/run").json()["running"] is False
    assert client.post("/api/train/stop", json={}).status_code == 409  # nothing training there


def test_stop_sends_ctrl_c_to_a_run_started_from_the_command_line(tmp_path):
    """Stop on a watched CLI run: SIGINT to the trainer's pid from progress.json (a motiontune process only)."""
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from motiontune.ui import create_app

    workspace = tmp_path / "cli-run"
    workspace.mkdir()
    marker, ready = tmp_path / "got-sigint", tmp_path / "ready"
    # stands in for `motiontune train` (the word is in its command line); exits 0 on SIGINT like the trainer, which
    # installs its own handler (a worker that ignores SIGINT would hand the ignoring down to a child)
    script = (f"import time, pathlib, signal  # motiontune\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"try:\n    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    pathlib.Path({str(marker)!r}).write_text('stopped')\n")
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:  # its handler is in place (a loaded machine starts slowly)
            time.sleep(0.05)
        (workspace / "progress.json").write_text(json.dumps({"state": "training", "pid": process.pid, "step": 1, "total_steps": 9}))
        client = TestClient(create_app(workspace), base_url="http://127.0.0.1:8765")
        assert client.get("/api/run").json()["running"] is True
        assert client.post("/api/train/stop", json={}).json() == {"signalled": process.pid}
        assert process.wait(20) == 0 and marker.read_text() == "stopped"
        # a process that is not motiontune's is never signalled, whatever progress.json says
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        (workspace / "progress.json").write_text(json.dumps({"state": "training", "pid": other.pid}))
        assert client.post("/api/train/stop", json={}).status_code == 409
        assert other.poll() is None
        other.kill()
        other.wait()
    finally:
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------------------------------------- validation and schema

def test_validation_errors_point_at_the_field():
    from motiontune.ui.server import validate

    base = {"concepts": [{"path": "clips"}]}
    _, errors = validate({**base, "lora_rank": 0, "clip_grad_norm": -1, "video_config": {"max_frames": "many"}, "bogus": 1})
    by_loc = {e["loc"]: e["msg"] for e in errors}
    assert set(by_loc) == {"lora_rank", "clip_grad_norm", "video_config.max_frames", "bogus"}
    assert by_loc["lora_rank"] == "must be at least 1 (got 0)" and by_loc["bogus"] == "unknown key"
    # the product's words, not pydantic's ("Input should be ..."); only the dtypes that train, and what "bf16" means
    _, errors = validate({**base, "train_dtype": "bf16"})
    assert errors == [{"loc": "train_dtype", "value": "bf16", "suggest": "BFLOAT_16",
                       "msg": "\"bf16\" is not a choice: use 'FLOAT_32', 'BFLOAT_16' or 'FLOAT_16'; did you mean 'BFLOAT_16'?"}]
    assert not any("Input should" in e["msg"] for e in validate({**base, "lora_rank": 0, "learning_rate": -1})[1])
    _, errors = validate({"concepts": [{"name": "x"}]})
    assert errors == [{"loc": "concepts.0.path", "msg": "this key is required"}]
    _, errors = validate({**base, "train_dtype": "FLOAT_8", "vae": {"train": True}})
    assert {e["loc"] for e in errors} == {"train_dtype", "vae.train"}
    _, errors = validate({})
    assert errors[0]["loc"] == "" and "concepts" in errors[0]["msg"]
    assert validate(base) [1] == []


def test_a_help_paragraph_shows_once_where_one_docs_row_explains_several_keys():
    """docs/config.md explains validation / validate_after / validate_after_unit in one row: the form showed its
    paragraph three times. Now under the first key, the others keeping their defaults and pointing to it."""
    from motiontune.ui.schema_help import schema_keys, ui_schema

    schema = ui_schema()
    top = schema["properties"]
    assert "VALIDATION concept" in top["validation"]["x-help"]
    assert top["validate_after"]["x-help"] == "default 1 · see validation, above"
    assert top["validate_after_unit"]["x-help"] == "default EPOCH · see validation, above"
    concept = schema["$defs"]["ConceptConfig"]["properties"]
    assert concept["balancing_strategy"]["x-help"] == "default REPEATS · see balancing, above"
    by_section: dict = {}
    for path, prop in schema_keys(schema):
        paragraph = (prop.get("x-help") or "").partition(" · ")[2]
        if len(paragraph) > 40:
            by_section.setdefault((tuple(path[:-1]), paragraph), []).append(path[-1])
    assert not {k: v for k, v in by_section.items() if len(v) > 1}  # no long paragraph twice in one section


def test_the_schema_carries_defaults_ranges_and_help_from_the_code():
    from motiontune.ui.schema_help import ui_schema

    schema = ui_schema()
    rank = schema["properties"]["lora_rank"]
    assert (rank["default"], rank["minimum"], rank["maximum"]) == (16, 1, 1024)
    assert "module names" in schema["properties"]["layer_filter"]["description"]  # from the comment in schema.py
    video = schema["$defs"]["VideoConfig"]["properties"]
    assert "0 draws anew every epoch" in video["window_variants"]["description"]
    part = schema["$defs"]["ModelPartConfig"]["properties"]["train"]
    assert "vae" in part["x-not-supported"] and "transformer" not in part["x-not-supported"]


# ---------------------------------------------------------------------------------------------- binding

def test_binds_loopback_by_default_and_warns_for_another_address(monkeypatch, capsys):
    import uvicorn

    from motiontune.cli import main
    from motiontune.ui.server import check_bind, is_loopback

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    assert main(["ui", "--port", "9123"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 9123
    assert "WARNING" not in capsys.readouterr().err
    assert main(["ui", "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0"
    assert "WARNING" in capsys.readouterr().err
    assert main(["ui", "--host", "::1"]) == 0 and "WARNING" not in capsys.readouterr().err
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match="--host"):
        check_bind("0.0.0.0", explicit=False)  # another caller cannot bind a public address by accident
    assert check_bind("127.0.0.1", explicit=False) is True and check_bind("0.0.0.0", explicit=True) is False


def test_requests_to_a_run_are_taken_once_in_order_and_old_ones_dropped(tmp_path):
    """train/requests.py, the trainer's side of Sample / Backup / Save now."""
    from motiontune.train.requests import Requests, answers, ask

    ask(tmp_path, "backup")  # left before the run started: not for it
    requests = Requests(tmp_path, enabled=True)
    assert requests.take() == []
    for action in ("sample", "save", "backup"):
        ask(tmp_path, action)
    (tmp_path / "requests" / "junk.json").write_text("not json")
    assert requests.take() == ["sample", "save", "backup"]
    assert requests.take() == [] and not list((tmp_path / "requests").glob("*.json"))
    requests.answer("sample", 7, "done")
    assert answers(tmp_path) == [{"action": "sample", "step": 7, "result": "done", "done": answers(tmp_path)[0]["done"]}]
    with pytest.raises(ValueError, match="unknown request"):
        ask(tmp_path, "explode")
    ask(tmp_path, "sample")
    assert Requests(tmp_path / "elsewhere", enabled=True).take() == [] and Requests(tmp_path, enabled=False).take() == []
