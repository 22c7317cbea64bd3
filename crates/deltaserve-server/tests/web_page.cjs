#!/usr/bin/env node
// Drives the web page at `/` in headless Chromium (playwright-core + Debian's chromium).
//
// Usage: node web_page.cjs URL SCREENSHOT.png EXPECTED_JSON
//   EXPECTED_JSON maps model name -> the text the server answers alone (greedy), e.g.
//   {"llama": "...", "t0": "..."}; those models are ticked, one prompt is sent to all of them,
//   and each column must stream exactly that text.
// The Rust test `web_page_in_headless_chromium` (tests/clients.rs) starts a server and runs this.
"use strict";

const { chromium } = require("playwright-core");

async function main() {
  const [url, shot, expectedJson] = process.argv.slice(2);
  const expected = JSON.parse(expectedJson);
  const wanted = Object.keys(expected);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url, { timeout: 30000 });
    await page.waitForSelector("#models input[type=checkbox]", { timeout: 30000 });
    const boxes = await page.$$("#models input[type=checkbox]");
    for (const box of boxes) {
      const name = await box.getAttribute("value");
      if (wanted.includes(name)) await box.check(); else await box.uncheck();
    }
    await page.fill("#max_tokens", "12");
    await page.fill("#temperature", "0");
    await page.fill("#prompt", "def main():");
    await page.click("#send");
    await page.waitForFunction(
      (n) => document.querySelectorAll(".answer[data-done='1']").length === n,
      wanted.length,
      { timeout: 60000 },
    );
    await page.waitForFunction(() => document.getElementById("status").textContent === "done", null, { timeout: 10000 });
    const columns = await page.$$eval(".answer", (divs) =>
      divs.map((d) => ({
        model: d.querySelector("h2 span").textContent,
        text: d.querySelector("pre").textContent,
        info: d.querySelector("h2 small").textContent,
        error: d.classList.contains("error"),
      })),
    );
    await page.screenshot({ path: shot, fullPage: true });
    const problems = [...errors];
    if (columns.length !== wanted.length) problems.push(`expected ${wanted.length} columns, got ${columns.length}`);
    for (const c of columns) {
      if (c.error) problems.push(`${c.model}: error ${c.text}`);
      else if (c.text !== expected[c.model]) problems.push(`${c.model}: streamed ${JSON.stringify(c.text)}, expected ${JSON.stringify(expected[c.model])}`);
    }
    console.log(JSON.stringify({ columns, problems }));
    if (problems.length) process.exit(1);
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
