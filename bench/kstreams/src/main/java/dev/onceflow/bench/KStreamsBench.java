package dev.onceflow.bench;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListOffsetsResult.ListOffsetsResultInfo;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.Metric;
import org.apache.kafka.common.MetricName;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Suppressed;
import org.apache.kafka.streams.kstream.TimeWindows;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.WindowStore;

/**
 * The Kafka Streams baseline of bench/bench_kafka.py. Two workloads, chosen by the first
 * argument:
 *
 * <ul>
 *   <li>{@code sum}: the running sum of {@code amount} per key, one output per input (the
 *       record cache off), the sum written as a JSON number;
 *   <li>{@code window}: a tumbling-window sum of {@code amount} per key with final emission
 *       ({@code suppress(untilWindowCloses)}), written as {@code {"start":ms,"sum":n}}.
 * </ul>
 *
 * <p>Timed mode (the default): the input topic is complete before the start; the timer runs
 * from {@code streams.start()} until the application's committed offsets reach the end of
 * every input partition. Under exactly_once_v2 the offsets are committed in the same
 * transaction as the outputs produced from those inputs, and the group coordinator exposes
 * them only once that transaction committed, so that instant is "all outputs committed".
 * One JSON object goes to stdout. With {@code --serve} (the latency figure) it runs until its
 * standard input closes or it gets SIGTERM, then closes and prints its JSON.
 *
 * <p>Any failure exits non-zero with the reason on stderr. The bench verifies the outputs
 * itself, read_committed, after the run.
 */
public final class KStreamsBench {
  private static final ObjectMapper MAPPER = new ObjectMapper();

  private KStreamsBench() {}

  /** The parsed command line: {@code MODE --name value ...}. */
  private static final class Args {
    String mode;
    String bootstrap;
    String input;
    String output;
    String appId;
    String stateDir;
    long commitIntervalMs = 100;
    String guarantee = StreamsConfig.EXACTLY_ONCE_V2;
    // -1: Kafka Streams' own default (10 MiB).
    long cacheMaxBytes = -1;
    long windowMs = 1000;
    long graceMs = 0;
    boolean serve;
    long pollMs = 10;
    long timeoutS = 600;
    final Map<String, String> extra = new LinkedHashMap<>();

    static Args parse(String[] argv) {
      if (argv.length == 0) {
        throw new IllegalArgumentException("usage: KStreamsBench sum|window --bootstrap H:P ...");
      }
      Args a = new Args();
      a.mode = argv[0];
      if (!a.mode.equals("sum") && !a.mode.equals("window")) {
        throw new IllegalArgumentException("mode must be sum or window, got " + a.mode);
      }
      for (int i = 1; i < argv.length; i++) {
        String flag = argv[i];
        if (flag.equals("--serve")) {
          a.serve = true;
          continue;
        }
        if (i + 1 >= argv.length) {
          throw new IllegalArgumentException(flag + " needs a value");
        }
        String v = argv[++i];
        switch (flag) {
          case "--bootstrap" -> a.bootstrap = v;
          case "--input" -> a.input = v;
          case "--output" -> a.output = v;
          case "--app-id" -> a.appId = v;
          case "--state-dir" -> a.stateDir = v;
          case "--commit-interval-ms" -> a.commitIntervalMs = Long.parseLong(v);
          case "--guarantee" -> a.guarantee = v;
          case "--cache-max-bytes" -> a.cacheMaxBytes = Long.parseLong(v);
          case "--window-ms" -> a.windowMs = Long.parseLong(v);
          case "--grace-ms" -> a.graceMs = Long.parseLong(v);
          case "--poll-ms" -> a.pollMs = Long.parseLong(v);
          case "--timeout-s" -> a.timeoutS = Long.parseLong(v);
          case "--config" -> {
            int eq = v.indexOf('=');
            if (eq <= 0) {
              throw new IllegalArgumentException("--config takes name=value, got " + v);
            }
            a.extra.put(v.substring(0, eq), v.substring(eq + 1));
          }
          default -> throw new IllegalArgumentException("unknown flag " + flag);
        }
      }
      if (a.bootstrap == null || a.input == null || a.output == null || a.appId == null
          || a.stateDir == null) {
        throw new IllegalArgumentException(
            "--bootstrap, --input, --output, --app-id and --state-dir are required");
      }
      return a;
    }
  }

  /** The decoder work of every engine in the bench: parse the whole value, take a field. */
  static long amount(byte[] value) {
    try {
      JsonNode node = MAPPER.readTree(value);
      return node.get("amount").asLong();
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  static Topology topology(Args a) {
    StreamsBuilder builder = new StreamsBuilder();
    KStream<String, byte[]> in =
        builder.stream(a.input, Consumed.with(Serdes.String(), Serdes.ByteArray()));
    KStream<String, Long> amounts = in.mapValues(KStreamsBench::amount);
    Grouped<String, Long> grouped = Grouped.with(Serdes.String(), Serdes.Long());
    if (a.mode.equals("sum")) {
      amounts
          .groupByKey(grouped)
          .reduce(
              Long::sum,
              Materialized.<String, Long, KeyValueStore<Bytes, byte[]>>as("sum")
                  .withKeySerde(Serdes.String())
                  .withValueSerde(Serdes.Long()))
          .toStream()
          .mapValues(sum -> Long.toString(sum))
          .to(a.output, Produced.with(Serdes.String(), Serdes.String()));
    } else {
      amounts
          .groupByKey(grouped)
          .windowedBy(
              TimeWindows.ofSizeAndGrace(Duration.ofMillis(a.windowMs), Duration.ofMillis(a.graceMs)))
          .reduce(
              Long::sum,
              Materialized.<String, Long, WindowStore<Bytes, byte[]>>as("wsum")
                  .withKeySerde(Serdes.String())
                  .withValueSerde(Serdes.Long()))
          .suppress(Suppressed.untilWindowCloses(Suppressed.BufferConfig.unbounded()))
          .toStream()
          .map(
              (wk, sum) ->
                  KeyValue.pair(
                      wk.key(), "{\"start\":" + wk.window().start() + ",\"sum\":" + sum + "}"))
          .to(a.output, Produced.with(Serdes.String(), Serdes.String()));
    }
    return builder.build();
  }

  static Properties config(Args a) {
    Properties p = new Properties();
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, a.appId);
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, a.bootstrap);
    p.put(StreamsConfig.STATE_DIR_CONFIG, a.stateDir);
    p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, a.guarantee);
    p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, Long.toString(a.commitIntervalMs));
    // One thread: one onceflow worker, one Quix process.
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, "1");
    if (a.cacheMaxBytes >= 0) {
      p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, Long.toString(a.cacheMaxBytes));
    }
    p.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
    p.putAll(a.extra);
    return p;
  }

  /** Thread-level metrics that say where the stream thread's time went. */
  private static final List<String> THREAD_METRICS =
      List.of(
          "commit-total",
          "commit-latency-avg",
          "commit-latency-max",
          "poll-latency-avg",
          "process-latency-avg",
          "poll-ratio",
          "process-ratio",
          "commit-ratio",
          "punctuate-ratio");

  /**
   * The stream thread's metrics of THREAD_METRICS (one thread), keyed by name with "-" as
   * "_"; latencies in ms, ratios are the share of the thread's time (over the last 30 s
   * sample window, Kafka Streams' default).
   */
  static Map<String, Object> threadMetrics(KafkaStreams streams) {
    Map<String, Object> out = new LinkedHashMap<>();
    for (Map.Entry<MetricName, ? extends Metric> e : streams.metrics().entrySet()) {
      MetricName n = e.getKey();
      if (n.group().equals("stream-thread-metrics") && THREAD_METRICS.contains(n.name())) {
        Object v = e.getValue().metricValue();
        if (v instanceof Number num && !Double.isNaN(num.doubleValue())) {
          out.put(n.name().replace('-', '_'), Math.round(num.doubleValue() * 1000) / 1000.0);
        }
      }
    }
    return out;
  }

  /** How many commits the stream thread made. */
  static long commits(Map<String, Object> metrics) {
    Object v = metrics.get("commit_total");
    return v instanceof Number num ? Math.round(num.doubleValue()) : -1;
  }

  /** The end offset of every partition of the (complete) input topic. */
  static Map<TopicPartition, Long> endOffsets(Admin admin, String topic)
      throws ExecutionException, InterruptedException {
    TopicDescription d = admin.describeTopics(List.of(topic)).allTopicNames().get().get(topic);
    Map<TopicPartition, OffsetSpec> req = new HashMap<>();
    d.partitions().forEach(p -> req.put(new TopicPartition(topic, p.partition()), OffsetSpec.latest()));
    Map<TopicPartition, Long> out = new HashMap<>();
    for (Map.Entry<TopicPartition, ListOffsetsResultInfo> e :
        admin.listOffsets(req).all().get().entrySet()) {
      out.put(e.getKey(), e.getValue().offset());
    }
    return out;
  }

  /** Whether the group's committed offsets reached every end offset. */
  static boolean allCommitted(Admin admin, String group, Map<TopicPartition, Long> ends)
      throws ExecutionException, InterruptedException {
    Map<TopicPartition, OffsetAndMetadata> committed =
        admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata().get();
    for (Map.Entry<TopicPartition, Long> e : ends.entrySet()) {
      if (e.getValue() == 0) {
        continue;
      }
      OffsetAndMetadata c = committed.get(e.getKey());
      if (c == null || c.offset() < e.getValue()) {
        return false;
      }
    }
    return true;
  }

  /** Exit when the parent closes our stdin (it stopped us, or it died). */
  static Thread stdinWatcher(Runnable onEof) {
    Thread t =
        new Thread(
            () -> {
              InputStream in = System.in;
              byte[] buf = new byte[256];
              try {
                while (in.read(buf) >= 0) {
                  // Nothing is sent on stdin; it exists only to end.
                }
              } catch (IOException ignored) {
                // A broken pipe means the same as EOF.
              }
              onEof.run();
            },
            "stdin-watcher");
    t.setDaemon(true);
    return t;
  }

  /** The Kafka version on the classpath, as kafka-clients records it in its jar. */
  static String kafkaVersion() {
    Properties p = new Properties();
    try (InputStream in =
        KStreamsBench.class.getResourceAsStream("/kafka/kafka-version.properties")) {
      if (in != null) {
        p.load(in);
      }
    } catch (IOException ignored) {
      // The version is informational; "unknown" says it could not be read.
    }
    return p.getProperty("version", "unknown");
  }

  static double seconds(long nanos) {
    return Math.round(nanos / 1e5) / 1e4;
  }

  public static void main(String[] argv) throws Exception {
    Args a;
    try {
      a = Args.parse(argv);
    } catch (IllegalArgumentException e) {
      System.err.println("error: " + e.getMessage());
      System.exit(2);
      return;
    }
    Topology topology = topology(a);
    KafkaStreams streams = new KafkaStreams(topology, config(a));
    AtomicLong runningAt = new AtomicLong();
    AtomicReference<Throwable> failure = new AtomicReference<>();
    CountDownLatch stopped = new CountDownLatch(1);
    streams.setStateListener(
        (now, before) -> {
          if (now == KafkaStreams.State.RUNNING) {
            runningAt.compareAndSet(0, System.nanoTime());
          }
          if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.PENDING_ERROR) {
            failure.compareAndSet(null, new IllegalStateException("Kafka Streams went to " + now));
            stopped.countDown();
          }
        });
    streams.setUncaughtExceptionHandler(
        e -> {
          failure.compareAndSet(null, e);
          stopped.countDown();
          return StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    Map<String, Object> row = new LinkedHashMap<>();
    row.put("engine", "kafka-streams");
    row.put("version", kafkaVersion());
    row.put("java", System.getProperty("java.version"));
    row.put("mode", a.mode);
    row.put("guarantee", a.guarantee);
    row.put("commit_interval_ms", a.commitIntervalMs);
    row.put("cache_max_bytes", a.cacheMaxBytes);
    if (a.mode.equals("window")) {
      row.put("window_ms", a.windowMs);
      row.put("grace_ms", a.graceMs);
    }
    int rc = a.serve ? serve(a, streams, runningAt, failure, stopped, row) : timed(a, streams, runningAt, failure, row);
    System.out.println(MAPPER.writeValueAsString(row));
    System.out.flush();
    System.exit(rc);
  }

  static int serve(
      Args a,
      KafkaStreams streams,
      AtomicLong runningAt,
      AtomicReference<Throwable> failure,
      CountDownLatch stopped,
      Map<String, Object> row)
      throws InterruptedException {
    Thread hook = new Thread(stopped::countDown, "sigterm");
    Runtime.getRuntime().addShutdownHook(hook);
    stdinWatcher(stopped::countDown).start();
    long t0 = System.nanoTime();
    streams.start();
    stopped.await();
    Map<String, Object> metrics = threadMetrics(streams);
    boolean closed = streams.close(Duration.ofSeconds(60));
    row.put("setup_s", runningAt.get() == 0 ? null : seconds(runningAt.get() - t0));
    row.put("commits", commits(metrics));
    row.put("thread_metrics", metrics);
    row.put("closed", closed);
    Throwable f = failure.get();
    if (f != null) {
      row.put("error", f.toString());
      f.printStackTrace();
      return 1;
    }
    return closed ? 0 : 1;
  }

  static int timed(
      Args a,
      KafkaStreams streams,
      AtomicLong runningAt,
      AtomicReference<Throwable> failure,
      Map<String, Object> row)
      throws Exception {
    stdinWatcher(() -> Runtime.getRuntime().halt(3)).start();
    Properties ap = new Properties();
    ap.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, a.bootstrap);
    try (Admin admin = Admin.create(ap)) {
      Map<TopicPartition, Long> ends = endOffsets(admin, a.input);
      long events = ends.values().stream().mapToLong(Long::longValue).sum();
      long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(a.timeoutS);
      int polls = 0;
      long lastPollNanos = 0;
      long t0 = System.nanoTime();
      streams.start();
      long t1;
      while (true) {
        Throwable f = failure.get();
        if (f != null) {
          streams.close(Duration.ofSeconds(30));
          row.put("error", f.toString());
          f.printStackTrace();
          return 1;
        }
        long p0 = System.nanoTime();
        boolean done = allCommitted(admin, a.appId, ends);
        long p1 = System.nanoTime();
        polls++;
        lastPollNanos = p1 - p0;
        if (done) {
          t1 = p1;
          break;
        }
        if (p1 > deadline) {
          streams.close(Duration.ofSeconds(30));
          row.put("error", "offsets not committed to the input's end in " + a.timeoutS + " s");
          System.err.println("error: " + row.get("error"));
          return 1;
        }
        Thread.sleep(a.pollMs);
      }
      Map<String, Object> metrics = threadMetrics(streams);
      long c0 = System.nanoTime();
      boolean closed = streams.close(Duration.ofSeconds(60));
      long c1 = System.nanoTime();
      double secs = seconds(t1 - t0);
      row.put("events", events);
      row.put("seconds", secs);
      row.put("eps", Math.round(events / ((t1 - t0) / 1e9) * 10) / 10.0);
      row.put("setup_s", runningAt.get() == 0 ? null : seconds(runningAt.get() - t0));
      row.put("commits", commits(metrics));
      row.put("thread_metrics", metrics);
      row.put("offset_polls", polls);
      row.put("last_poll_s", seconds(lastPollNanos));
      row.put("close_s", seconds(c1 - c0));
      row.put("closed", closed);
      List<String> parts = new ArrayList<>();
      ends.forEach((tp, off) -> parts.add(tp.partition() + ":" + off));
      row.put("input_end_offsets", String.join(",", parts));
      return closed ? 0 : 1;
    }
  }
}
