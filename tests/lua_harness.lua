-- Runs dissectors/vfio_user.lua outside Wireshark, on a stand-in of the
-- small part of Wireshark's Lua API it uses, so that tests can load and run
-- it on every Lua the plugin must support (5.2 as in Wireshark 4.0, 5.4 as
-- in 4.4+).  Usage: lua harness.lua PLUGIN MESSAGES
--   MESSAGES: one line per message, "interface c2s(0|1) ts_seconds wire_length hex"
--   (wire_length above the bytes given: a message the capture cut).
-- Prints, for the second pass, one line per field: "frame<TAB>name<TAB>value"
-- (integers in decimal, bools 0/1, bytes and strings in hex) and
-- "frame<TAB>expert<TAB>id" per expert item.

local plugin, messages = arg[1], arg[2]

-- Lua 5.2's standalone interpreter has bit32; Wireshark 4.0 gives `bit`.
if _VERSION == "Lua 5.2" then bit = bit32 end
local band = bit32 and bit32.band or load("return function(a, b) return a & b end")()

local function identity_table() return setmetatable({}, {__index = function(_, k) return k end}) end
base, frametype = identity_table(), identity_table()
expert = {group = identity_table(), severity = identity_table()}

local current = {}
UInt64 = {new = function(n) return {u64 = n} end}

local function field(kind)
    return function(abbr, label, a, b, mask)
        local f = {abbr = abbr, kind = kind}
        if kind == "bool" then f.mask = mask
        elseif kind:match("^uint") then f.mask = mask end
        return f
    end
end
ProtoField = setmetatable({}, {__index = function(_, kind) return field(kind) end})
ProtoExpert = {new = function(abbr) return {abbr = abbr} end}
function Proto(name) return {abbr = name, kind = "proto"} end
-- A field extractor: the messages given here carry no packet comment.
Field = {new = function() return function() end end}

-- Tvb and TvbRange over a Lua string.
local Range = {}
Range.__index = Range
local function range(data, offset, length) return setmetatable({data = data, offset = offset, length = length}, Range) end
function Range:raw() return self.data:sub(self.offset + 1, self.offset + self.length) end
function Range:le_uint()
    local value = 0
    for i = self.length, 1, -1 do value = value * 256 + self.data:byte(self.offset + i) end
    return value
end
function Range:uint() return self.data:byte(self.offset + 1) end
-- The exact unsigned decimal of the range, as Wireshark's C code shows a field.
function Range:decimal()
    local digits = {0}                  -- little-endian base-10 digits
    for i = self.length, 1, -1 do
        local carry = self.data:byte(self.offset + i)
        for k = 1, #digits do
            local v = digits[k] * 256 + carry
            digits[k], carry = v % 10, (v - v % 10) / 10
        end
        while carry > 0 do digits[#digits + 1], carry = carry % 10, (carry - carry % 10) / 10 end
    end
    local out = {}
    for k = #digits, 1, -1 do out[#out + 1] = string.format("%d", digits[k]) end
    return table.concat(out)
end

local function tvb(data, wire)
    return setmetatable({}, {__call = function(_, offset, length)
        offset = offset or 0
        length = length or (#data - offset)
        if offset + length > #data or length < 0 then error("range out of bounds") end
        return range(data, offset, length)
    end, __index = {len = function() return #data end, reported_len = function() return wire end}})
end

-- A tree that prints what is added to it.
local Item = {}
Item.__index = Item
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end

local function shown(f, r, value)
    if type(value) == "table" and value.u64 then value = value.u64 end
    if f.kind == "bool" then
        if value == nil then value = band(r:le_uint(), f.mask or 0xFFFFFFFF) ~= 0 end
        return value and "1" or "0"
    elseif f.kind:match("^uint") then
        if value == nil and not f.mask then return r:decimal() end
        if value == nil then
            value = r:le_uint()
            if f.mask then
                value = band(value, f.mask)
                local m = f.mask
                while m % 2 == 0 do value, m = value / 2, m / 2 end
            end
        end
        return string.format("%d", value)
    elseif f.kind == "bytes" then
        return value and hex(value) or hex(r:raw())
    elseif f.kind == "string" then
        return hex(value or r:raw())
    elseif f.kind == "double" then
        return string.format("%.9f", value)
    end
    return tostring(value)
end

function Item:add(f, r, value)
    if getmetatable(r) ~= Range then r, value = nil, r end
    if f.kind ~= "proto" and f.kind ~= "none" and current.print then
        print(string.format("%d\t%s\t%s", current.number, f.abbr, shown(f, r, value)))
    end
    return setmetatable({}, Item)
end
Item.add_le = Item.add
function Item:set_text() end
function Item:append_text() end
function Item:set_generated() return self end
function Item:add_proto_expert_info(e)
    if current.print then
        print(string.format("%d\texpert\t%s", current.number, e.abbr:gsub("^vfio_user%.expert%.", "")))
    end
end

local proto = nil
local real_proto = Proto
function Proto(...) proto = real_proto(...) return proto end
dofile(plugin)

local rows = {}
for line in io.lines(messages) do
    local interface, c2s, ts, wire, data = line:match("^(%d+) (%d) (%S+) (%d+) (%x*)$")
    rows[#rows + 1] = {interface = tonumber(interface), c2s = c2s == "1", ts = tonumber(ts),
                       wire = tonumber(wire),
                       data = (data:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))}
end

if proto.init then proto.init() end
for pass = 1, 2 do
    for number, row in ipairs(rows) do
        current = {number = number, print = pass == 2}
        -- the export's Exported PDU tags put connection and channel in the ports
        local pinfo = {number = number, visited = pass == 2, p2p_dir = row.c2s and 1 or 0,
                       src_port = row.interface, dst_port = 0,
                       rel_ts = row.ts, cols = {}}
        proto.dissector(tvb(row.data, row.wire), pinfo, setmetatable({}, Item))
    end
end
