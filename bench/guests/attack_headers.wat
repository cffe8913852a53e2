;; attack_headers.wat — a response head of 2,015,232 header lines ("a:b"), 8 MB in all.
;;
;; Why: issue 10, hole 2. The whole output fits max_response_bytes (8 MiB), so only a bound
;; on the header block (max_response_headers, max_response_header_bytes: 502) stops it; a
;; host that parses and encodes it on the event loop freezes every tenant of the worker.
;;
;; Output:  content-type: text/plain
;;          a:b                         (123 blocks of 16,384 lines)
;;          (blank line)
;;          headers
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. constant text;
;;          65536..131071 one block of 16,384 "a:b\n" lines.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 2)

  (global $BLOCK i32 (i32.const 65536))
  (global $BLOCK_BYTES i32 (i32.const 65536))
  (global $BLOCKS i32 (i32.const 123))
  (global $LINE i32 (i32.const 0x0a623a61))  ;; "a:b\n", little-endian

  (data (i32.const 64) "content-type: text/plain\n")  ;; 25 bytes
  (data (i32.const 96) "\nheaders\n")                 ;; 9 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (local $offset i32)
    (local $block i32)
    (loop $fill
      (i32.store (i32.add (global.get $BLOCK) (local.get $offset)) (global.get $LINE))
      (local.set $offset (i32.add (local.get $offset) (i32.const 4)))
      (br_if $fill (i32.lt_u (local.get $offset) (global.get $BLOCK_BYTES))))
    (call $print (i32.const 64) (i32.const 25))
    (loop $blocks
      (call $print (global.get $BLOCK) (global.get $BLOCK_BYTES))
      (local.set $block (i32.add (local.get $block) (i32.const 1)))
      (br_if $blocks (i32.lt_u (local.get $block) (global.get $BLOCKS))))
    (call $print (i32.const 96) (i32.const 9))))
