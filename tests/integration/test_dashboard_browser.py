"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against the real
broker and the real server (aiohttp on a free port in this process).

Screenshots of each test land in AMQTASK_TEST_ARTIFACTS (or a folder under pytest's tmp dir,
printed), for a person to look at; nothing asserts on pixels.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright, expect
from pydantic import BaseModel

import amqtask
from amqtask import _schedule_admin
from amqtask.dashboard import create_dashboard

from .conftest import AppFactory, depth_is, running, wait_for

CHROMIUM = os.environ.get("AMQTASK_TEST_CHROMIUM", "/usr/bin/chromium")
HOW_TO_GET_CHROMIUM = (
    "the dashboard's browser tests drive Debian's Chromium, which is not installed "
    f"({CHROMIUM} missing): run `apt-get install -y chromium`, or set AMQTASK_TEST_CHROMIUM to "
    "a Chromium binary (`playwright install` is not needed)"
)
SLOW = 20_000  # ms: a few 2 s polls of the page, and the sampler's first reads


class Job(BaseModel):
    n: int


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    """Where the screenshots go, said on the terminal (also when every test passes)."""
    where = os.environ.get("AMQTASK_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("dashboard-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        print(f"\ndashboard screenshots: {path}")
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; missing, the tests fail saying how to install it (never skip)."""
    found = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which(CHROMIUM)
    if found is None:
        pytest.fail(HOW_TO_GET_CHROMIUM, pytrace=False)
    return found


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def dashboard(app: amqtask.App, **options: Any) -> AsyncIterator[str]:
    """The dashboard of `app` served on a free loopback port; yields its URL."""
    runner = web.AppRunner(create_dashboard(app, port=None, **options), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/"
    finally:
        await runner.cleanup()


PAGE_ERRORS: dict[Page, list[str]] = {}


async def open_page(browser: Browser, url: str, **context: Any) -> Page:
    """A new page at `url`; its uncaught script errors are collected in PAGE_ERRORS[page]."""
    page = await (await browser.new_context(**context)).new_page()
    errors = PAGE_ERRORS.setdefault(page, [])
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url)
    return page


async def backlog(make_app: AppFactory, contract: amqtask.Contract[Any, Any], count: int) -> None:
    async with make_app([contract]) as producer:
        for n in range(count):
            await producer.send(contract, Job(n=n))


async def dead_lettered(
    make_app: AppFactory, amqp: AbstractConnection, contract: amqtask.Contract[Any, Any], count: int
) -> amqtask.App:
    """An app on `contract` whose handler fails every task once, and `count` dead letters."""
    app = make_app([contract])
    failed: list[int] = []

    @app.handler(contract)
    async def handle(task: Job) -> None:
        failed.append(task.n)
        raise RuntimeError(f"job {task.n} broke <b>badly</b>")

    await app.declare()
    await backlog(make_app, contract, count)
    async with running(app):
        await wait_for(lambda: len(failed) == count)
    await wait_for(lambda: depth_is(amqp, f"{contract.queue}.dead", count))
    return app


def cell(page: Page, task: str, name: str) -> Any:
    return page.locator(f'[data-testid="task-row-{task}"] [data-testid="{name}"]')


async def test_overview_shows_the_backlog_of_a_task_without_workers_and_a_rates_chart(
    make_app: AppFactory, browser: Browser, unique: str, artifacts: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    await backlog(make_app, job, 7)
    async with dashboard(app) as url:
        page = await open_page(browser, url)
        await expect(cell(page, job.name, "ready")).to_have_text("7", timeout=SLOW)
        await expect(cell(page, job.name, "consumers")).to_have_text("0")
        await expect(cell(page, job.name, "dead-letters")).to_have_text("0")
        await expect(page.locator('[data-testid="rates-chart"] canvas').first).to_be_visible()
        await page.screenshot(path=artifacts / "overview.png", full_page=True)
        assert PAGE_ERRORS.pop(page) == []


async def test_a_dead_letter_replayed_from_the_page_leaves_the_table_and_reaches_the_work_queue(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str, artifacts: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = await dead_lettered(make_app, amqp, job, 3)
    async with dashboard(app) as url:
        page = await open_page(browser, url)
        await expect(cell(page, job.name, "dead-letters")).to_have_text("3", timeout=SLOW)
        await page.get_by_role("link", name="Dead letters", exact=True).click()
        await page.get_by_role("link", name=job.name).click()
        rows = page.locator('tr[data-testid^="letter-"]')
        await expect(rows).to_have_count(3, timeout=SLOW)
        # The error is shown as text: the markup in it is not rendered.
        await expect(rows.first).to_contain_text("<b>badly</b>")
        testid = await rows.first.get_attribute("data-testid")
        assert testid is not None
        message_id = testid.removeprefix("letter-")
        await rows.first.locator('[data-testid="select"]').check()
        await page.screenshot(path=artifacts / "dead-letters-selected.png", full_page=True)
        await page.get_by_test_id("replay-selected").click()
        dialog = page.get_by_test_id("confirm-dialog")
        await expect(dialog).to_be_visible()
        await page.screenshot(path=artifacts / "dead-letters-confirm.png")
        await page.get_by_test_id("confirm").click()
        await expect(page.get_by_test_id(f"letter-{message_id}")).to_have_count(0, timeout=SLOW)
        await expect(rows).to_have_count(2)
        await page.screenshot(path=artifacts / "dead-letters-replayed.png", full_page=True)
        assert PAGE_ERRORS.pop(page) == []
    await wait_for(lambda: depth_is(amqp, job.queue, 1))
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(job.queue, passive=True)
        message = await queue.get(fail=True)
        assert message is not None
        assert message.message_id == message_id
        await message.ack()


async def test_two_dead_letters_sharing_an_id_are_two_rows_and_purging_one_leaves_the_other(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    async with amqp.channel() as channel:
        for n in (1, 2):
            await channel.default_exchange.publish(
                aio_pika.Message(f'{{"n":{n}}}'.encode(), message_id="twice"),
                routing_key=f"{job.queue}.dead",
            )
    async with dashboard(app) as url:
        page = await open_page(browser, url + f"#/dead-letters/{job.name}")
        rows = page.locator('tr[data-testid="letter-twice"]')
        await expect(rows).to_have_count(2, timeout=SLOW)
        await rows.nth(1).get_by_test_id("purge").click()
        await page.get_by_test_id("confirm").click()
        await expect(rows).to_have_count(1, timeout=SLOW)
        assert PAGE_ERRORS.pop(page) == []
    await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 1))
    async with amqp.channel() as channel:
        queue = await channel.declare_queue(f"{job.queue}.dead", passive=True)
        message = await queue.get(fail=True)
        assert message is not None
        assert message.body == b'{"n":1}'  # the first copy stayed; only the row clicked went
        await message.nack(requeue=True)


async def test_purge_all_purges_nothing_when_more_letters_came_than_the_dialog_said(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()

    async def dead_letter(n: int) -> None:
        async with amqp.channel() as channel:
            await channel.default_exchange.publish(
                aio_pika.Message(f'{{"n":{n}}}'.encode(), message_id=f"m{n}"),
                routing_key=f"{job.queue}.dead",
            )

    await dead_letter(1)
    async with dashboard(app) as url:
        page = await open_page(browser, url + f"#/dead-letters/{job.name}")
        rows = page.locator('tr[data-testid^="letter-"]')
        await expect(rows).to_have_count(1, timeout=SLOW)
        await page.get_by_test_id("purge-all").click()
        await expect(page.get_by_test_id("confirm-dialog")).to_contain_text("1 dead letter")
        await dead_letter(2)  # arrives while the dialog is open
        await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 2))
        await page.get_by_test_id("confirm").click()
        await expect(page.get_by_text("nothing purged").first).to_be_visible(timeout=SLOW)
        await expect(rows).to_have_count(2, timeout=SLOW)  # the page read the queue again
        assert await depth_is(amqp, f"{job.queue}.dead", 2)
        await page.get_by_test_id("purge-all").click()
        await expect(page.get_by_test_id("confirm-dialog")).to_contain_text("2 dead letters")
        await page.get_by_test_id("confirm").click()
        await expect(rows).to_have_count(0, timeout=SLOW)
    await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 0))


async def test_a_cancelled_confirmation_replays_nothing(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = await dead_lettered(make_app, amqp, job, 1)
    async with dashboard(app) as url:
        page = await open_page(browser, url + f"#/dead-letters/{job.name}")
        rows = page.locator('tr[data-testid^="letter-"]')
        await expect(rows).to_have_count(1, timeout=SLOW)
        await page.get_by_test_id("replay-all").click()
        await page.get_by_test_id("cancel").click()
        await expect(page.get_by_test_id("confirm-dialog")).to_be_hidden()
        await page.wait_for_timeout(2500)  # a poll later: still there
        await expect(rows).to_have_count(1)
    assert await depth_is(amqp, job.queue, 0)
    assert await depth_is(amqp, f"{job.queue}.dead", 1)


HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


async def test_markup_in_a_dead_letter_is_shown_as_text_and_never_runs(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str, artifacts: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    app = make_app([job])
    await app.declare()
    letter = aio_pika.Message(
        f'{{"n": 1, "note": "{HOSTILE}"}}'.encode(),
        message_id="m1<b>x</b>",
        headers={
            "amqtask-task": job.name,
            "amqtask-reason": f"handler_error {HOSTILE}",
            "amqtask-error": f"ValueError: {HOSTILE}",
            "amqtask-traceback": f"Traceback (most recent call last):\n  {HOSTILE}",
            "amqtask-attempt": "abc",
            "x-custom": HOSTILE,
        },
    )
    async with amqp.channel() as channel:
        await channel.default_exchange.publish(letter, routing_key=f"{job.queue}.dead")
    await wait_for(lambda: depth_is(amqp, f"{job.queue}.dead", 1))
    async with dashboard(app) as url:
        page = await open_page(browser, url + f"#/dead-letters/{job.name}")
        row = page.get_by_test_id("letter-m1<b>x</b>")
        await expect(row).to_contain_text(f"ValueError: {HOSTILE}", timeout=SLOW)
        await expect(row).to_contain_text("abc")
        await row.get_by_role("link", name="m1<b>x</b>").click()
        detail = page.get_by_test_id("letter-detail")
        await expect(detail.get_by_test_id("body")).to_contain_text(HOSTILE, timeout=SLOW)
        await expect(detail.get_by_test_id("traceback")).to_contain_text(HOSTILE)
        await expect(detail).to_contain_text(f"handler_error {HOSTILE}")
        await page.screenshot(path=artifacts / "dead-letter-hostile.png", full_page=True)
        assert await page.evaluate("window.pwned") is None
        assert await page.locator("#view img, #view script, #view b").count() == 0
        assert PAGE_ERRORS.pop(page) == []


async def test_a_schedule_paused_by_a_click_is_paused_for_the_schedulers(
    make_app: AppFactory, browser: Browser, unique: str, artifacts: Path
) -> None:
    tick = amqtask.contract(f"{unique}.tick", Job)
    beat = amqtask.schedule("beat", tick, Job(n=0), every=timedelta(hours=1))
    app = make_app([tick], schedules=[beat])
    await app.declare()
    async with dashboard(app) as url:
        page = await open_page(browser, url + "#/schedules")
        row = page.get_by_test_id("schedule-beat")
        await expect(row.get_by_test_id("state")).to_have_text("active", timeout=SLOW)
        await row.get_by_test_id("pause").click()
        await page.get_by_test_id("confirm").click()
        await expect(row.get_by_test_id("state")).to_have_text("paused", timeout=SLOW)
        await expect(row.get_by_test_id("resume")).to_be_visible()
        await page.screenshot(path=artifacts / "schedules-paused.png", full_page=True)
    listing = await _schedule_admin.read_state(app, timeout=1.0)
    assert listing.state is not None
    assert listing.state.schedules["beat"].paused is True


async def test_tasks_of_the_store_are_found_and_one_is_revoked_from_its_timeline(
    make_app: AppFactory, browser: Browser, unique: str, tmp_path: Path, artifacts: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    store = f"sqlite:///{tmp_path}/tasks.db"
    app = make_app([job], store=store)
    await app.declare()
    async with make_app([job], store=store) as producer:
        ids = [await producer.send(job, Job(n=n)) for n in range(3)]
    async with dashboard(app) as url:
        page = await open_page(browser, url + "#/tasks")
        for task_id in ids:
            await expect(page.get_by_test_id(f"task-{task_id}")).to_be_visible(timeout=SLOW)
        await page.get_by_test_id("search-id").fill(ids[1])
        await page.get_by_test_id("search").click()
        await expect(page.locator('tr[data-testid^="task-"]')).to_have_count(1, timeout=SLOW)
        await page.get_by_role("link", name=ids[1]).click()
        detail = page.get_by_test_id("task-detail")
        await expect(detail.get_by_test_id("timeline")).to_contain_text("queued", timeout=SLOW)
        await detail.get_by_test_id("revoke").click()
        await page.get_by_test_id("confirm").click()
        await expect(detail.get_by_test_id("timeline")).to_contain_text("revoked", timeout=SLOW)
        await page.screenshot(path=artifacts / "task-revoked.png", full_page=True)
        assert PAGE_ERRORS.pop(page) == []
    info = await app.task(ids[1])
    assert info is not None
    assert info.state == "revoked"


async def test_the_overview_fits_a_phone_screen(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str, artifacts: Path
) -> None:
    job = amqtask.contract(
        f"{unique}.a-rather-long-task-name", Job, retry=amqtask.Retry(attempts=1)
    )
    app = await dead_lettered(make_app, amqp, job, 2)
    await backlog(make_app, job, 5)
    async with dashboard(app) as url:
        page = await open_page(
            browser, url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
        )
        await expect(cell(page, job.name, "ready")).to_have_text("5", timeout=SLOW)
        await expect(cell(page, job.name, "dead-letters")).to_have_text("2")
        await page.screenshot(path=artifacts / "overview-phone.png", full_page=True)
        width = await page.evaluate("document.documentElement.clientWidth")
        assert await page.evaluate("document.documentElement.scrollWidth") <= width
        # Nothing sticks out to the right, except inside a table's own scrolling container.
        outside = await page.evaluate(
            """(width) => [...document.querySelectorAll('body *')]
                .filter((el) => !el.closest('.table-wrap') && el.getClientRects().length)
                .filter((el) => el.getBoundingClientRect().right > width + 0.5)
                .map((el) => el.tagName + '.' + el.className)""",
            width,
        )
        assert outside == []


async def test_a_broker_out_of_reach_is_said_on_the_page(
    browser: Browser, unique: str, artifacts: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job)
    # Nothing listens on port 1: the sampler fails, the server keeps serving and says why.
    app = amqtask.App("amqp://guest:guest@127.0.0.1:1/", [job], namespace=unique, connect_timeout=1)
    try:
        async with dashboard(app) as url:
            page = await open_page(browser, url)
            banner = page.get_by_test_id("error")
            await expect(banner).to_contain_text("broker unreachable", timeout=SLOW)
            await expect(banner).to_contain_text("127.0.0.1:1")
            await expect(banner).not_to_contain_text("guest:guest")
            await expect(page.get_by_test_id("live")).to_contain_text("no connection")
            await page.screenshot(path=artifacts / "broker-unreachable.png", full_page=True)
            assert PAGE_ERRORS.pop(page) == []
    finally:
        await app.close()


async def test_read_only_mode_offers_no_replay_or_purge(
    make_app: AppFactory, amqp: AbstractConnection, browser: Browser, unique: str, artifacts: Path
) -> None:
    job = amqtask.contract(f"{unique}.job", Job, retry=amqtask.Retry(attempts=1))
    app = await dead_lettered(make_app, amqp, job, 2)
    async with dashboard(app, read_only=True) as url:
        page = await open_page(browser, url + f"#/dead-letters/{job.name}")
        await expect(page.locator('tr[data-testid^="letter-"]')).to_have_count(2, timeout=SLOW)
        await expect(page.get_by_test_id("read-only")).to_be_visible()
        await page.locator('tr[data-testid^="letter-"]').first.get_by_test_id("select").check()
        for name in ("replay-selected", "purge-selected", "replay-all", "purge-all"):
            await expect(page.get_by_test_id(name)).to_be_disabled()
        for button in await page.locator('[data-testid="replay"], [data-testid="purge"]').all():
            await expect(button).to_be_disabled()
        await page.screenshot(path=artifacts / "dead-letters-read-only.png", full_page=True)
    assert await depth_is(amqp, f"{job.queue}.dead", 2)
