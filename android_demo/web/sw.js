// Offline support: every same-origin GET (the page, the runtime, vendor/, the bundle's files) goes to the network
// first and is kept in Cache Storage; without a network the cached copy answers, so a page that loaded once
// (model included) loads and chats again offline.
const CACHE = 'edgephi-v1';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (ev) => ev.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (ev) => {
  const req = ev.request;
  if (req.method !== 'GET' || new URL(req.url).origin !== self.location.origin) return;
  ev.respondWith((async () => {
    const cache = await caches.open(CACHE);
    try {
      const res = await fetch(req);
      if (res.status === 200) ev.waitUntil(cache.put(req, res.clone()));  // stored while the page reads it
      return res;
    } catch (e) {
      const hit = await cache.match(req);
      if (hit) return hit;
      throw e;
    }
  })());
});
