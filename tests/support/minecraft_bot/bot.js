// The tests' Minecraft player: a mineflayer bot driven by JSON lines on stdin that
// reports JSON lines on stdout (tests/support/minecraft.py reads them).
//
// Usage: node bot.js HOST PORT USERNAME
// Commands: {"cmd": "place", "x", "y", "z"}  place a stone block (against the one below)
//           {"cmd": "dig", "x", "y", "z"}    dig a block
//           {"cmd": "chat", "text"}          say something; "chat" reports the echo
//           {"cmd": "blocks", "positions": [[x, y, z], ...]}  the names of blocks there
//           {"cmd": "gaps"}                  the longest silence since the last "gaps"
//           {"cmd": "quit"}
// Events: login, spawn, placed, dug, chat, blocks, keepalive (gap since the last one),
//         gaps, error, kicked, end.
'use strict'
const readline = require('readline')
const mineflayer = require('mineflayer')
const { Vec3 } = require('vec3')

const [host, port, username] = process.argv.slice(2)
const started = Date.now()
const say = (event, fields = {}) =>
  process.stdout.write(JSON.stringify({ event, t: Date.now(), ...fields }) + '\n')

const bot = mineflayer.createBot({
  host, port: Number(port), username, auth: 'offline', version: process.env.MC_VERSION || false,
  checkTimeoutInterval: 60 * 1000, hideErrors: true, physicsEnabled: false
})

let lastPacket = 0 // ms: when the server last sent anything
let longestSilence = 0 // ms since the last "gaps" command
let lastKeepAlive = 0
bot._client.on('packet', () => {
  const now = Date.now()
  if (lastPacket) longestSilence = Math.max(longestSilence, now - lastPacket)
  lastPacket = now
})
bot._client.on('keep_alive', () => {
  const now = Date.now()
  if (lastKeepAlive) say('keepalive', { gap_ms: now - lastKeepAlive })
  lastKeepAlive = now
})
bot.once('login', () => say('login', { ms: Date.now() - started }))
bot.once('spawn', () => {
  const p = bot.entity.position
  say('spawn', { ms: Date.now() - started, x: Math.floor(p.x), y: Math.floor(p.y), z: Math.floor(p.z) })
})
bot.on('chat', (from, message) => { if (from === username) say('chat', { text: message }) })
bot.on('kicked', (reason) => say('kicked', { reason: typeof reason === 'string' ? reason : JSON.stringify(reason) }))
bot.on('error', (e) => say('error', { message: String(e && e.message ? e.message : e) }))
bot.on('end', (reason) => { say('end', { reason: String(reason) }); process.exit(0) })

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function stone () {
  const item = bot.registry.itemsByName.stone
  if (bot.heldItem && bot.heldItem.type === item.id) return
  const Item = require('prismarine-item')(bot.registry)
  await bot.creative.setInventorySlot(36, new Item(item.id, 64))
  await bot.equip(item.id, 'hand')
}

async function place (x, y, z) {
  await stone()
  const below = bot.blockAt(new Vec3(x, y - 1, z))
  if (!below) throw new Error(`no block loaded at ${x} ${y - 1} ${z}`)
  const begun = Date.now()
  await bot.placeBlock(below, new Vec3(0, 1, 0)) // resolves when the server confirms it
  return Date.now() - begun
}

async function handle (c) {
  if (c.cmd === 'place') {
    say('placed', { x: c.x, y: c.y, z: c.z, ms: await place(c.x, c.y, c.z) })
  } else if (c.cmd === 'dig') {
    // flying-squid does not echo a creative player's own dig: the dig is sent at once
    // and a second bot (or "blocks") checks it.
    const dug = bot.dig(bot.blockAt(new Vec3(c.x, c.y, c.z)), true)
    const echoed = await Promise.race([dug.then(() => true), sleep(2000).then(() => false)])
    say('dug', { x: c.x, y: c.y, z: c.z, echoed })
  } else if (c.cmd === 'chat') {
    bot.chat(c.text)
  } else if (c.cmd === 'blocks') {
    await bot.waitForChunksToLoad()
    const names = c.positions.map(([x, y, z]) => {
      const b = bot.blockAt(new Vec3(x, y, z))
      return b ? b.name : null
    })
    say('blocks', { names })
  } else if (c.cmd === 'gaps') {
    say('gaps', { longest_ms: longestSilence, since_ms: lastPacket ? Date.now() - lastPacket : 0 })
    longestSilence = 0
  } else if (c.cmd === 'quit') {
    bot.quit()
  } else {
    throw new Error('unknown command ' + c.cmd)
  }
}

// One command at a time, in order: a test reads one answer per command.
let queue = Promise.resolve()
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.trim()) return
  if (JSON.parse(line).cmd === 'quit') return bot.quit() // not behind a stuck command
  queue = queue.then(() => handle(JSON.parse(line)))
    .catch((e) => say('error', { message: String(e && e.message ? e.message : e), line }))
})
