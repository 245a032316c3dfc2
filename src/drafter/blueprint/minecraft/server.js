// The guest's Minecraft server: flying-squid in offline mode on a superflat world.
// Usage: node server.js SETTINGS.json (written by drafter-blueprint --app minecraft).
'use strict'
const fs = require('fs')
const mcServer = require('flying-squid')

// flying-squid gives its plugins 5 s to load and then rejects a promise nobody handles,
// which ends node; on a slow (emulated) CPU they take longer and are ready later.
process.on('unhandledRejection', (e) => console.error('unhandled rejection: ' + (e && e.message ? e.message : e)))

const settings = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const server = mcServer.createMCServer(settings)
server.on('listening', () => console.log('listening on port ' + settings.port))
server.on('pluginsReady', () => console.log('plugins ready'))
server.on('error', (e) => console.error('server error: ' + (e && e.stack ? e.stack : e)))
