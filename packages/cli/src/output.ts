import Table from "cli-table3";

/** Prints rows as an aligned table, or as JSON with `--json`. */
export function printRows(
  rows: Array<Record<string, unknown>>,
  opts: { json?: boolean; columns: Array<{ key: string; header: string }> },
): void {
  if (opts.json) {
    process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
    return;
  }
  const table = new Table({
    head: opts.columns.map((c) => c.header),
    style: { head: [], border: [] },
    chars: { mid: "", "left-mid": "", "mid-mid": "", "right-mid": "" },
  });
  for (const row of rows) table.push(opts.columns.map((c) => String(row[c.key] ?? "")));
  process.stdout.write(`${table.toString()}\n`);
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}
