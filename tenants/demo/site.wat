;; site.wat — a small static site: serves files from the read-only volume `/static`.
;;
;; Why: shows a prefix route (`/site/...`) and a tenant volume at work. The
;; file is named by PATH_INFO, opened relative to the preopened directory, and
;; streamed to stdout; the host's sandbox and this guest's own check both keep
;; the request inside the volume.
;;
;; Behaviour:
;;   PATH_INFO "" or "/"       → index.html; any path ending in "/" → its index.html
;;   a segment ".."            → Status: 400, "bad path"
;;   file missing / unreadable → Status: 404, "not found"
;;   no volume named /static   → Status: 500, "no /static volume"
;;   found                     → content-type by extension (.html, .css, .txt,
;;                               else application/octet-stream), then the file
;;
;; Memory:  0..7 iovec {ptr, len}; 8..15 two i32 results; 16..23 prestat;
;;          64..1023 constant text; 1024..1279 preopen name; 4096..8191 path;
;;          65536..131071 read buffer; 131072.. environment (grown to fit).
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                   (param $nread i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close"
    (func $fd_close (param $fd i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param $fd i32) (param $prestat i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name"
    (func $fd_prestat_dir_name (param $fd i32) (param $path i32) (param $len i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param $dirfd i32) (param $dirflags i32) (param $path i32)
                     (param $path_len i32) (param $oflags i32) (param $rights_base i64)
                     (param $rights_inheriting i64) (param $fdflags i32) (param $fd i32)
                     (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param $count i32) (param $size i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param $ptrs i32) (param $strs i32) (result i32)))

  (memory (export "memory") 3)

  (global $IOV i32 (i32.const 0))
  (global $RESULT i32 (i32.const 8))
  (global $RESULT2 i32 (i32.const 12))
  (global $PRESTAT i32 (i32.const 16))
  (global $NAME i32 (i32.const 1024))
  (global $NAME_MAX i32 (i32.const 256))
  (global $PATH i32 (i32.const 4096))
  ;; Room for the path and an appended "index.html" inside 4096..8191.
  (global $PATH_MAX i32 (i32.const 4000))
  (global $BUF i32 (i32.const 65536))
  (global $BUF_LEN i32 (i32.const 65536))
  (global $ENV i32 (i32.const 131072))
  ;; The first preopened fd in WASI; the ones after it follow without gaps.
  (global $FIRST_PREOPEN i32 (i32.const 3))
  ;; WASI rights bit fd_read: all this guest does with the file.
  (global $RIGHT_FD_READ i64 (i64.const 2))

  (global $env_count (mut i32) (i32.const 0))

  (data (i32.const 64) "content-type: ")                  ;; 14
  (data (i32.const 80) "\n\n")                            ;; 2
  (data (i32.const 96) "text/html; charset=utf-8")        ;; 24
  (data (i32.const 128) "text/css; charset=utf-8")        ;; 23
  (data (i32.const 160) "text/plain; charset=utf-8")      ;; 25
  (data (i32.const 192) "application/octet-stream")       ;; 24
  (data (i32.const 224) ".html")                          ;; 5
  (data (i32.const 232) ".css")                           ;; 4
  (data (i32.const 240) ".txt")                           ;; 4
  (data (i32.const 248) "PATH_INFO=")                     ;; 10
  (data (i32.const 264) "/static")                        ;; 7
  (data (i32.const 272) "index.html")                     ;; 10
  (data (i32.const 288) "Status: 404\ncontent-type: text/plain\n\nnot found\n")          ;; 48
  (data (i32.const 352) "Status: 400\ncontent-type: text/plain\n\nbad path\n")           ;; 47
  (data (i32.const 400) "Status: 500\ncontent-type: text/plain\n\nno /static volume\n")  ;; 56

  ;; Write [ptr, ptr+len) to fd, retrying short writes. Returns 0 or an errno;
  ;; a write that makes no progress counts as EIO (29) rather than a spin.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (local $err i32) (local $done i32)
    (block $finished
      (loop $more
        (br_if $finished (i32.eqz (local.get $len)))
        (i32.store (global.get $IOV) (local.get $ptr))
        (i32.store offset=4 (global.get $IOV) (local.get $len))
        (local.set $err (call $fd_write (local.get $fd) (global.get $IOV) (i32.const 1)
                                        (global.get $RESULT)))
        (if (local.get $err) (then (return (local.get $err))))
        (local.set $done (i32.load (global.get $RESULT)))
        (if (i32.eqz (local.get $done)) (then (return (i32.const 29))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $done)))
        (local.set $len (i32.sub (local.get $len) (local.get $done)))
        (br $more)))
    (i32.const 0))

  (func $print (param $ptr i32) (param $len i32)
    (drop (call $write_all (i32.const 1) (local.get $ptr) (local.get $len))))

  ;; Grow memory so that [0, end) is addressable; traps if the host refuses.
  (func $reserve (param $end i32)
    (local $pages i32)
    (local.set $pages (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable)))))

  ;; 1 if the n bytes at a and at b are equal.
  (func $memeq (param $a i32) (param $b i32) (param $n i32) (result i32)
    (block $differ
      (loop $next
        (if (i32.eqz (local.get $n)) (then (return (i32.const 1))))
        (br_if $differ (i32.ne (i32.load8_u (local.get $a)) (i32.load8_u (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 1)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; 1 if the len bytes at p end with the slen bytes at s.
  (func $ends_with (param $p i32) (param $len i32) (param $s i32) (param $slen i32) (result i32)
    (if (i32.lt_u (local.get $len) (local.get $slen)) (then (return (i32.const 0))))
    (call $memeq (i32.sub (i32.add (local.get $p) (local.get $len)) (local.get $slen))
                 (local.get $s) (local.get $slen)))

  (func $strlen (param $p i32) (result i32)
    (local $q i32)
    (local.set $q (local.get $p))
    (block $end
      (loop $next
        (br_if $end (i32.eqz (i32.load8_u (local.get $q))))
        (local.set $q (i32.add (local.get $q) (i32.const 1)))
        (br $next)))
    (i32.sub (local.get $q) (local.get $p)))

  ;; The preopened directory named /static, or -1. Preopens are numbered from
  ;; fd 3 on; fd_prestat_get fails (EBADF) just past the last one.
  (func $find_volume (result i32)
    (local $fd i32) (local $len i32)
    (local.set $fd (global.get $FIRST_PREOPEN))
    (block $none
      (loop $next
        (br_if $none (call $fd_prestat_get (local.get $fd) (global.get $PRESTAT)))
        (local.set $len (i32.load offset=4 (global.get $PRESTAT)))
        (if (i32.and (i32.eqz (i32.load8_u (global.get $PRESTAT)))  ;; tag 0: a directory
                     (i32.eq (local.get $len) (i32.const 7)))
          (then
            (if (i32.eqz (call $fd_prestat_dir_name (local.get $fd) (global.get $NAME)
                                                    (local.get $len)))
              (then
                (if (call $memeq (global.get $NAME) (i32.const 264) (i32.const 7))
                  (then (return (local.get $fd))))))))
        (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
        (br $next)))
    (i32.const -1))

  ;; Fetch the environment into memory at $ENV: pointers, then the strings.
  (func $load_env
    (local $count i32) (local $size i32) (local $strs i32)
    (if (call $environ_sizes_get (global.get $RESULT) (global.get $RESULT2)) (then (return)))
    (local.set $count (i32.load (global.get $RESULT)))
    (local.set $size (i32.load (global.get $RESULT2)))
    (local.set $strs (i32.add (global.get $ENV) (i32.shl (local.get $count) (i32.const 2))))
    (call $reserve (i32.add (local.get $strs) (local.get $size)))
    (if (call $environ_get (global.get $ENV) (local.get $strs)) (then (return)))
    (global.set $env_count (local.get $count)))

  ;; The value of the variable whose "NAME=" is the prefix_len bytes at
  ;; prefix, as a NUL-terminated string; 0 when it is not set.
  (func $getenv (param $prefix i32) (param $prefix_len i32) (result i32)
    (local $i i32) (local $s i32)
    (block $none
      (loop $next
        (br_if $none (i32.ge_u (local.get $i) (global.get $env_count)))
        (local.set $s (i32.load (i32.add (global.get $ENV) (i32.shl (local.get $i) (i32.const 2)))))
        (if (call $memeq (local.get $s) (local.get $prefix) (local.get $prefix_len))
          (then (return (i32.add (local.get $s) (local.get $prefix_len)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; 1 if any "/"-separated segment of the len bytes at p is "..".
  (func $has_dotdot (param $p i32) (param $len i32) (result i32)
    (local $i i32) (local $start i32)
    (loop $next
      (if (i32.or (i32.eq (local.get $i) (local.get $len))
                  (i32.eq (i32.load8_u (i32.add (local.get $p) (local.get $i))) (i32.const 47)))
        (then
          (if (i32.and (i32.eq (i32.sub (local.get $i) (local.get $start)) (i32.const 2))
                       (i32.eq (i32.load16_u (i32.add (local.get $p) (local.get $start)))
                               (i32.const 0x2e2e)))
            (then (return (i32.const 1))))
          (local.set $start (i32.add (local.get $i) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $next (i32.le_u (local.get $i) (local.get $len))))
    (i32.const 0))

  ;; The content-type for a file name, by its extension: (ptr, len) of the text.
  (func $content_type (param $p i32) (param $len i32) (result i32 i32)
    (if (call $ends_with (local.get $p) (local.get $len) (i32.const 224) (i32.const 5))
      (then (return (i32.const 96) (i32.const 24))))
    (if (call $ends_with (local.get $p) (local.get $len) (i32.const 232) (i32.const 4))
      (then (return (i32.const 128) (i32.const 23))))
    (if (call $ends_with (local.get $p) (local.get $len) (i32.const 240) (i32.const 4))
      (then (return (i32.const 160) (i32.const 25))))
    (i32.const 192) (i32.const 24))

  (func $write_headers (param $p i32) (param $len i32)
    (call $print (i32.const 64) (i32.const 14))
    (call $print (call $content_type (local.get $p) (local.get $len)))
    (call $print (i32.const 80) (i32.const 2)))

  ;; The three error answers, each a whole response.
  (func $not_found (call $print (i32.const 288) (i32.const 48)))
  (func $bad_path (call $print (i32.const 352) (i32.const 47)))
  (func $no_volume (call $print (i32.const 400) (i32.const 56)))

  ;; Read up to a buffer's worth from fd into $BUF: the count, or -1 on error.
  (func $read_chunk (param $fd i32) (result i32)
    (i32.store (global.get $IOV) (global.get $BUF))
    (i32.store offset=4 (global.get $IOV) (global.get $BUF_LEN))
    (if (call $fd_read (local.get $fd) (global.get $IOV) (i32.const 1) (global.get $RESULT))
      (then (return (i32.const -1))))
    (i32.load (global.get $RESULT)))

  (func (export "_start")
    (local $dir i32) (local $src i32) (local $len i32) (local $fd i32) (local $n i32)
    (local.set $dir (call $find_volume))
    (if (i32.lt_s (local.get $dir) (i32.const 0))
      (then (call $no_volume) (return)))

    ;; The requested path: PATH_INFO (already percent-decoded) without its leading slashes.
    (call $load_env)
    (local.set $src (call $getenv (i32.const 248) (i32.const 10)))
    (if (local.get $src) (then (local.set $len (call $strlen (local.get $src)))))
    (block $trimmed
      (loop $next
        (br_if $trimmed (i32.eqz (local.get $len)))
        (br_if $trimmed (i32.ne (i32.load8_u (local.get $src)) (i32.const 47)))
        (local.set $src (i32.add (local.get $src) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (if (i32.gt_u (local.get $len) (global.get $PATH_MAX))
      (then (call $not_found) (return)))
    (memory.copy (global.get $PATH) (local.get $src) (local.get $len))

    ;; A directory means its index.html.
    (if (if (result i32) (i32.eqz (local.get $len))
          (then (i32.const 1))
          (else (i32.eq (i32.load8_u (i32.add (global.get $PATH)
                                              (i32.sub (local.get $len) (i32.const 1))))
                        (i32.const 47))))
      (then
        (memory.copy (i32.add (global.get $PATH) (local.get $len)) (i32.const 272) (i32.const 10))
        (local.set $len (i32.add (local.get $len) (i32.const 10)))))

    (if (call $has_dotdot (global.get $PATH) (local.get $len))
      (then (call $bad_path) (return)))

    (if (call $path_open (local.get $dir) (i32.const 0) (global.get $PATH) (local.get $len)
                         (i32.const 0) (global.get $RIGHT_FD_READ) (i64.const 0) (i32.const 0)
                         (global.get $RESULT))
      (then (call $not_found) (return)))
    (local.set $fd (i32.load (global.get $RESULT)))

    ;; Read before answering: a directory opens but does not read, and is a 404 too.
    (local.set $n (call $read_chunk (local.get $fd)))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then
        (drop (call $fd_close (local.get $fd)))
        (call $not_found)
        (return)))
    (call $write_headers (global.get $PATH) (local.get $len))
    (block $eof
      (loop $next
        (br_if $eof (i32.le_s (local.get $n) (i32.const 0)))
        (br_if $eof (call $write_all (i32.const 1) (global.get $BUF) (local.get $n)))
        (local.set $n (call $read_chunk (local.get $fd)))
        (br $next)))
    (drop (call $fd_close (local.get $fd)))))
