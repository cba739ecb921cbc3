// Builds replication/block-hash.wat into the base64 bytes in replication/block-hash.ts
// (npm run build:wasm; needs the wabt devDependency). The bytes are committed: nothing
// is compiled at install or at run time.
const fs = require('node:fs');
const path = require('node:path');
const dir = path.join(__dirname, '..', 'replication');
require('wabt')().then((wabt) => {
  const wat = fs.readFileSync(path.join(dir, 'block-hash.wat'), 'utf8');
  const { buffer } = wabt.parseWat('block-hash.wat', wat, { simd: true }).toBinary({});
  const ts = path.join(dir, 'block-hash.ts');
  const source = fs.readFileSync(ts, 'utf8');
  const next = source.replace(
    /const WASM_BASE64 =\n {2}'[^']*';/,
    `const WASM_BASE64 =\n  '${Buffer.from(buffer).toString('base64')}';`,
  );
  if (next === source) console.log('block-hash.ts is up to date');
  else fs.writeFileSync(ts, next);
});
