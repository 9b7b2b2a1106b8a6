// The web console in a real headless browser: Debian's chromium, driven by
// playwright-core (run by tests/gateway/local.rs, which checks the outcome through the
// API). Prints one JSON report on its last line; exits 1 on any failure.
//
// Environment: INTRACOM_URL, INTRACOM_ADMIN_TOKEN, INTRACOM_BILLING_TOKEN,
// INTRACOM_DEAD_ID (a dead letter to send again), INTRACOM_CHROMIUM (the browser),
// INTRACOM_PLAYWRIGHT (the playwright-core package directory), INTRACOM_SCREENSHOT
// (where to save a screenshot of the page once its charts hold data).
import { createRequire } from "node:module";

const env = process.env;
const require = createRequire(import.meta.url);
const { chromium } = require(env.INTRACOM_PLAYWRIGHT);
const base = env.INTRACOM_URL;
const step = (text) => console.error("console test: " + text);

const browser = await chromium.launch({
  executablePath: env.INTRACOM_CHROMIUM,
  headless: true,
  // Root in a container has no user namespace for the sandbox.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(30000);
  const pageErrors = [];
  const elsewhere = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  page.on("request", (request) => {
    if (!request.url().startsWith(base)) elsewhere.push(request.url());
  });

  step("the page loads");
  await page.goto(base + "/");
  await page.fill("#token", env.INTRACOM_ADMIN_TOKEN);
  await page.click("#login button[type=submit]");
  await page.waitForSelector("#tail[data-live=true]");

  step("a message published through the API appears in the live tail");
  const response = await fetch(base + "/publish", {
    method: "POST",
    headers: { Authorization: "Bearer " + env.INTRACOM_BILLING_TOKEN, "Content-Type": "application/json" },
    body: JSON.stringify({ action: "reload", query: { from: "the console test" } }),
  });
  if (response.status !== 201) throw new Error("publish: " + response.status + " " + (await response.text()));
  const receipt = await response.json();
  const row = page.locator(`#tail tbody tr[data-id="${receipt.id}"]`);
  await row.waitFor();
  const text = await row.textContent();
  if (!text.includes("reload") || !text.includes("the console test")) throw new Error("tail row: " + text);

  step("the stats and the catalog show");
  await page.waitForFunction(() => document.querySelector("#medium").textContent === "memory");
  await page.locator("#catalog li", { hasText: "billing" }).first().waitFor();
  step("a name that is not plain ASCII shows its code points");
  await page.locator("#catalog li", { hasText: "bill\u0456ng [U+0456]: reload" }).waitFor();
  await page.locator("#summary dd").first().waitFor();

  step("a dead letter is retried with its button");
  const dead = page.locator(`#dead tbody tr[data-id="${env.INTRACOM_DEAD_ID}"]`);
  await dead.locator("button.show").click();
  await page.waitForFunction((id) => document.querySelector("#dead-detail").textContent.includes(id), env.INTRACOM_DEAD_ID);
  await dead.locator("button.retry").click();
  await dead.waitFor({ state: "detached" });
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("sent again"));

  step("after traffic, the charts hold data");
  const publish = async (body) => {
    const answer = await fetch(base + "/publish", {
      method: "POST",
      headers: { Authorization: "Bearer " + env.INTRACOM_BILLING_TOKEN, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (answer.status !== 201) throw new Error("publish: " + answer.status + " " + (await answer.text()));
  };
  for (let n = 0; n < 20; n++) await publish({ action: "reload", query: { n } });
  // Work nobody claims: it waits in billing/invoice.render.
  for (let n = 0; n < 3; n++) await publish({ action: "invoice.render", to: "billing", work: true, query: { n } });
  // Points with values from the traffic: a publish rate, the waiting work, a latency
  // (the live tail delivered the broadcasts). The gateway samples every 5 s.
  const charted = (selector, series, atLeast) =>
    page.waitForFunction(
      ([selector, series, atLeast]) =>
        [...document.querySelectorAll(`${selector} circle[data-series="${series}"]`)].some(
          (c) => Number(c.dataset.value) >= atLeast,
        ),
      [selector, series, atLeast],
    );
  await charted("#chart-rate", "published", 0.1);
  await charted("#chart-rate", "delivered", 0.1);
  await charted("#chart-depth", "queue depth", 3);
  await charted("#chart-latency", "p50", 0);
  const charts = await page.evaluate(() => {
    const of = (selector) => {
      const svg = document.querySelector(selector);
      const values = (series) =>
        [...svg.querySelectorAll(`circle[data-series="${series}"]`)].map((c) => Number(c.dataset.value));
      const series = [...new Set([...svg.querySelectorAll("circle")].map((c) => c.dataset.series))];
      return {
        points: Number(svg.dataset.points),
        paths: svg.querySelectorAll("path.line").length,
        series: Object.fromEntries(series.map((s) => [s, values(s)])),
      };
    };
    return { rate: of("#chart-rate"), depth: of("#chart-depth"), latency: of("#chart-latency") };
  });
  if (env.INTRACOM_SCREENSHOT) {
    await page.locator("#charts-panel").scrollIntoViewIfNeeded();
    await page.screenshot({ path: env.INTRACOM_SCREENSHOT, fullPage: true });
  }

  console.log(JSON.stringify({
    charts,
    published: receipt.id,
    medium: await page.textContent("#medium"),
    status: await page.textContent("#status"),
    pageErrors,
    elsewhere,
  }));
} catch (error) {
  console.error("console test failed: " + (error && error.stack ? error.stack : error));
  process.exitCode = 1;
} finally {
  await browser.close();
}
