"""The built-in pages in headless Chromium (Debian's chromium + chromedriver, driven by Selenium),
and cancelling a running txt2img, against a real router and a real agent with its ComfyUI.

Selenium blocks, and the router runs on this test's event loop, so every browser step runs in a
worker thread. Screenshots go to test-artifacts/ (or $GPUGATE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpugate.settings import PROJECT_ROOT, Settings
from router.keys import create_key
from router.state import STORE
from tests.services import TINY_CATALOG, Agents, Router, call, router_settings_in, until

ARTIFACTS = Path(os.environ.get("GPUGATE_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), TINY_CATALOG, sync_timeout_s="120")


@pytest.fixture(scope="module")
async def agent(router: Router, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    agents.start("gpu-1", 7.9, ["tiny.safetensors"], GPUGATE_AGENT__RUNNERS='["comfy", "chat"]',
                 GPUGATE_CHAT__CONTEXT="1024")
    try:
        await router.wait_for_agents("gpu-1")
        yield agents
    finally:
        agents.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert CHROMIUM and CHROMEDRIVER, "the page tests need Debian's chromium and chromium-driver (install.sh --dev)"
    os.environ["SE_OFFLINE"] = "true"  # Selenium must not look for drivers on the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, css: str, timeout: float = 60, check: Any = None) -> Any:
    """The first element matching ``css`` (and ``check``), waiting for it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d: Any) -> Any:
        for element in d.find_elements(By.CSS_SELECTOR, css):
            if check is None or check(element):
                return element
        return False

    return WebDriverWait(driver, timeout, poll_frequency=0.2,  # live pages re-render: look again
                         ignored_exceptions=[StaleElementReferenceException]).until(found, f"no {css} on the page")


def _log_in(driver: Any, url: str, key: str, page: str) -> None:
    driver.get(f"{url}/ui/#{page}")
    driver.execute_script("localStorage.setItem('gpugate.key', arguments[0]); window.dispatchEvent(new HashChangeEvent('hashchange'));", key)


def _dashboard(driver: Any, url: str, key: str, job_id: int) -> None:
    _log_in(driver, url, key, "dashboard")
    _wait(driver, '#agents .agent[data-name="gpu-1"]', check=lambda e: "test GPU" in e.text and "7.9 GB free of 8.0 GB" in e.text)
    _wait(driver, f'#recent tr[data-job="{job_id}"]',
          check=lambda e: all(word in e.text for word in ("Completed", "TextToImage", "gpu-1")))
    driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def _playground(driver: Any, url: str, key: str) -> int:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _log_in(driver, url, key, "playground")
    Select(_wait(driver, "#playground-api", check=lambda e: "TextToImage" in e.text)).select_by_value("TextToImage")
    form = _wait(driver, "#playground-form", check=lambda e: e.find_elements(By.NAME, "positivePrompt"))
    models = [o.text for o in Select(form.find_element(By.NAME, "model")).options]
    assert "tiny (Stable Diffusion 1.5, 512x512, 20 steps, cfg 7)" in models, "what can run now, with its family's defaults"
    form.find_element(By.NAME, "positivePrompt").send_keys("a red lighthouse")
    for name in ("width", "height"):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys("64")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    image = _wait(driver, "#playground-result img", timeout=180,
                  check=lambda e: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", e))
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [64, 64]
    src = image.get_attribute("src")
    assert src.startswith(f"{url}/artifacts/") and "&sig=" in src, "the page loads the signed URL, with no header"
    driver.save_screenshot(str(ARTIFACTS / "playground.png"))
    return int(_wait(driver, "#playground-result").get_attribute("data-job-id"))


def _workflow_playground(driver: Any, url: str, key: str) -> None:
    """ComfyWorkflow in the playground: pick a served workflow, its own parameters become the form."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _log_in(driver, url, key, "playground")
    Select(_wait(driver, "#playground-api", check=lambda e: "ComfyWorkflow" in e.text)).select_by_value("ComfyWorkflow")
    Select(_wait(driver, "#playground-workflow", check=lambda e: "upscale" in e.text)).select_by_value("txt2img")
    form = _wait(driver, "#playground-form", check=lambda e: e.find_elements(By.NAME, "steps"))
    assert "euler" in [o.text for o in Select(form.find_element(By.NAME, "sampler")).options]
    form.find_element(By.NAME, "prompt").send_keys("a blue boat")
    for name, value in (("width", "64"), ("height", "64"), ("steps", "1")):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    image = _wait(driver, "#playground-result img", timeout=180,
                  check=lambda e: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", e))
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [64, 64]
    driver.save_screenshot(str(ARTIFACTS / "playground-workflow.png"))


def _chat(driver: Any, url: str, key: str) -> str:
    """The chat page: pick a served model, send a message, watch the answer stream in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _log_in(driver, url, key, "chat")
    models = Select(_wait(driver, "#chat-model", check=lambda e: "smollm2" in e.text.lower()))
    models.select_by_visible_text(next(o.text for o in models.options if "smollm2" in o.text.lower()))  # its file name here
    driver.find_element(By.ID, "chat-input").send_keys("What is the capital of France?")
    driver.find_element(By.ID, "chat-send").click()
    _wait(driver, "#chat-send", timeout=120, check=lambda e: e.is_enabled())  # the stream ended
    answer = _wait(driver, "#chat-log .message.assistant p", check=lambda e: e.text.strip()).text
    assert not _wait(driver, "#chat-error").text, "no error shown"
    driver.save_screenshot(str(ARTIFACTS / "chat.png"))
    return answer


def _keys(driver: Any, url: str, key: str) -> str:
    from selenium.webdriver.common.by import By

    _log_in(driver, url, key, "keys")
    form = _wait(driver, "#key-form")
    form.find_element(By.NAME, "name").send_keys("made in the page")
    form.find_element(By.NAME, "apis").send_keys("TextToImage")
    form.find_element(By.CSS_SELECTOR, "button").click()
    shown = _wait(driver, "#key-new", check=lambda e: e.is_displayed() and "gg_" in e.text).text
    row = _wait(driver, "#key-list tr", check=lambda e: "made in the page" in e.text)
    assert "TextToImage" in row.text
    row.find_element(By.TAG_NAME, "button").click()
    _wait(driver, "#key-list tr", check=lambda e: "made in the page" in e.text and "revoked" in e.text)
    driver.save_screenshot(str(ARTIFACTS / "keys.png"))
    return shown


def _explorer(driver: Any, url: str, key: str) -> str:
    _log_in(driver, url, key, "api")
    _wait(driver, '#operations li[data-operation="QueueTextToImage"]').click()
    shown = _wait(driver, "#operation", check=lambda e: "positivePrompt" in e.text).text
    driver.save_screenshot(str(ARTIFACTS / "api.png"))
    return shown


async def test_the_dashboard_shows_the_agent_and_a_finished_job(router: Router, agent: Agents, admin: Any,
                                                                browser: Any) -> None:
    done = await call(router, admin.token, "QueueTextToImage", {"positivePrompt": "dashboard", "width": 64, "height": 64})
    await until(router, admin.token, done["jobId"], lambda a: a["jobState"] == "Completed")
    await asyncio.to_thread(_dashboard, browser, router.url, admin.token, done["jobId"])


async def test_the_playground_runs_txt2img_and_shows_the_image(router: Router, agent: Agents, admin: Any,
                                                               browser: Any) -> None:
    job_id = await asyncio.to_thread(_playground, browser, router.url, admin.token)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin.token}"}) as http:
        async with http.get(f"{router.url}/api/GetArtifactGenerationStatus", params={"jobId": job_id}) as r:
            answer = await r.json()
    assert answer["jobState"] == "Completed" and answer["results"][0]["provider"] == "gpu-1"


async def test_the_playground_runs_a_workflow_an_agent_serves(router: Router, agent: Agents, admin: Any,
                                                               browser: Any) -> None:
    await asyncio.to_thread(_workflow_playground, browser, router.url, admin.token)


async def test_the_chat_page_streams_an_answer_from_a_served_model(router: Router, agent: Agents, admin: Any,
                                                                   browser: Any) -> None:
    answer = await asyncio.to_thread(_chat, browser, router.url, admin.token)
    [job] = (await call(router, admin.token, "QueryJobs", {"limit": 1}))["jobs"]
    assert job["api"] == "OpenAiChatCompletion" and job["jobState"] == "Completed" and job["agent"] == "gpu-1"
    chat = await call(router, admin.token, "GetOpenAiChatStatus", {"jobId": job["jobId"]})
    assert answer == chat["result"]["choices"][0]["message"]["content"].strip(), "the page showed the whole answer"


async def test_the_keys_page_makes_and_revokes_a_key(router: Router, admin: Any, browser: Any) -> None:
    shown = await asyncio.to_thread(_keys, browser, router.url, admin.token)
    token = next(word for word in shown.split() if word.startswith("gg_"))
    refused = await call(router, token, "QueueTextToImage", {"positivePrompt": "x"}, status=401)
    assert refused["responseStatus"]["errorCode"] == "Unauthorized", "revoked in the page"


async def test_the_api_explorer_shows_each_operation_from_the_openapi_document(router: Router, admin: Any,
                                                                               browser: Any) -> None:
    shown = await asyncio.to_thread(_explorer, browser, router.url, admin.token)
    assert "POST /api/QueueTextToImage" in shown and "multipart/form-data or application/json" in shown


async def test_a_client_key_cannot_manage_keys(router: Router, browser: Any) -> None:
    client = create_key(router.app[STORE], "client")
    await asyncio.to_thread(_log_in, browser, router.url, client.token, "keys")
    await asyncio.to_thread(_wait, browser, "#keys-error", 30, lambda e: "admin key" in e.text)


# ---- cancel --------------------------------------------------------------------------------------


async def test_a_queued_and_a_running_txt2img_are_cancelled_and_comfyui_is_free_at_once(router: Router, agent: Agents,
                                                                                        admin: Any) -> None:
    running = await call(router, admin.token, "QueueTextToImage", {"positivePrompt": "long", "width": 384, "height": 384})
    queued = await call(router, admin.token, "QueueTextToImage", {"positivePrompt": "waits", "width": 64, "height": 64})
    headers = {"Authorization": f"Bearer {admin.token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{router.url}/api/GetJobEvents", params={"jobId": running["jobId"]}) as stream:
            async for line in stream.content:  # wait for the first sampling step
                if line.startswith(b"data: ") and (json.loads(line[6:]).get("progress") or {}).get("step"):
                    break
    dropped = await call(router, admin.token, "CancelJob", {"jobId": queued["jobId"]})
    assert dropped["jobState"] == "Cancelled" and dropped["status"].startswith("cancelled by key")
    cancelled = await call(router, admin.token, "CancelJob", {"jobId": running["jobId"]})
    assert cancelled["jobState"] == "Cancelled"
    assert cancelled["responseStatus"]["errorCode"] == "Cancelled"
    started = time.monotonic()
    after = await call(router, admin.token, "TextToImage", {"positivePrompt": "next", "width": 64, "height": 64})
    assert after["results"][0]["provider"] == "gpu-1"
    assert time.monotonic() - started < 60, "ComfyUI was still busy with the cancelled prompt"
    for job_id in (running["jobId"], queued["jobId"]):
        final = await until(router, admin.token, job_id, lambda a: a["jobState"] != "Started")
        assert final["jobState"] == "Cancelled" and final["results"] == [], "a cancelled job never completes"
    log = (agent.root / "gpu-1.log").read_text()
    assert "job cancelled by the router" in log
    assert f"job received job={queued['jobId']} " not in log, "the queued job never reached the agent"
