;; attack_routes_many.wat — a 1 KB module whose `_routes` declares 503,808 routes.
;;
;; Why: issue 10, hole 4. Every worker holds every route of every module (+250 MiB each for
;; 500,000); once fixed, max_routes_per_module and max_routes_output_bytes refuse it (422).
;;
;; Output of _routes:  /00000 _start ... /7afff _start   (14 bytes a line, 7 MB in all)
;; Output of _start:   content-type: text/plain, blank line, "many\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. constant text;
;;          1024..58367 a buffer of 4,096 route lines, printed when full.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (global $BUFFER i32 (i32.const 1024))
  (global $LINE_BYTES i32 (i32.const 14))
  (global $LINES_PER_BUFFER i32 (i32.const 4096))
  (global $ROUTES i32 (i32.const 503808))  ;; 123 buffers
  (global $SPACE_START_NEWLINE i64 (i64.const 0x0a74726174735f20))  ;; " _start\n", LE

  (data (i32.const 64) "content-type: text/plain\n\nmany\n")  ;; 31 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  ;; The hex digit of `value` at bit `shift`, as an ASCII character.
  (func $hex_digit (param $value i32) (param $shift i32) (result i32)
    (local $digit i32)
    (local.set $digit (i32.and (i32.shr_u (local.get $value) (local.get $shift)) (i32.const 15)))
    (select (i32.add (local.get $digit) (i32.const 48))
            (i32.add (local.get $digit) (i32.const 87))
            (i32.lt_u (local.get $digit) (i32.const 10))))

  (func (export "_routes")
    (local $route i32)
    (local $line i32)
    (local $at i32)
    (loop $buffers
      (local.set $line (i32.const 0))
      (loop $lines
        (local.set $at (i32.add (global.get $BUFFER)
                                (i32.mul (local.get $line) (global.get $LINE_BYTES))))
        (i32.store8 (local.get $at) (i32.const 47))  ;; "/"
        (i32.store8 offset=1 (local.get $at) (call $hex_digit (local.get $route) (i32.const 16)))
        (i32.store8 offset=2 (local.get $at) (call $hex_digit (local.get $route) (i32.const 12)))
        (i32.store8 offset=3 (local.get $at) (call $hex_digit (local.get $route) (i32.const 8)))
        (i32.store8 offset=4 (local.get $at) (call $hex_digit (local.get $route) (i32.const 4)))
        (i32.store8 offset=5 (local.get $at) (call $hex_digit (local.get $route) (i32.const 0)))
        (i64.store offset=6 (local.get $at) (global.get $SPACE_START_NEWLINE))
        (local.set $route (i32.add (local.get $route) (i32.const 1)))
        (local.set $line (i32.add (local.get $line) (i32.const 1)))
        (br_if $lines (i32.lt_u (local.get $line) (global.get $LINES_PER_BUFFER))))
      (call $print (global.get $BUFFER)
                   (i32.mul (global.get $LINES_PER_BUFFER) (global.get $LINE_BYTES)))
      (br_if $buffers (i32.lt_u (local.get $route) (global.get $ROUTES)))))

  (func (export "_start")
    (call $print (i32.const 64) (i32.const 31))))
